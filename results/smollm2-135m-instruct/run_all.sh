#!/usr/bin/env bash
# The SmolLM2-135M-Instruct runs of results/smollm2-135m-instruct/ (CPU, one torch thread
# each, niced: the machine is shared). Resumable: re-run to carry on.
# Usage: bash results/smollm2-135m-instruct/run_all.sh /path/to/SmolLM2-135M-Instruct.Q4_1.gguf <group>
set -euo pipefail
cd "$(dirname "$0")/../.."
source results/report_runs.sh
MODEL=${1:?path to SmolLM2-135M-Instruct.Q4_1.gguf}
GROUP=${2:-all}
OUT=results/smollm2-135m-instruct
export GOMP_SPINCOUNT=20000
EVAL="nice -n 10 .venv/bin/depass-eval --model $MODEL --threads 1 --seed 0 --no-progress"
case $GROUP in
  tokens-known) $EVAL --protocol tokens --dataset known --size 200 --out $OUT/tokens-known ;;
  tokens-ioi) $EVAL --protocol tokens --dataset ioi --size 200 --out $OUT/tokens-ioi ;;
  tokens-longra) $EVAL --protocol tokens --dataset longra --size 100 --out $OUT/tokens-longra ;;
  components) $EVAL --protocol components --dataset counterfact --size 100 --out $OUT/components-counterfact
              $EVAL --protocol components --dataset ioi-component --size 100 --out $OUT/components-ioi ;;
  truth) $EVAL --protocol truth --size 20 --out $OUT/truth ;;
  language) $EVAL --protocol language --size 20 --probe-size 600 --out $OUT/language ;;
  # The tuning slice (prompts from the other end of the seeded order, the test prompts
  # excluded): DePass variants only, to choose a split rule, temperature and first-token rule.
  tune-known) $EVAL --protocol tokens --dataset known --size 30 --tuning-slice \
                --exclude $OUT/tokens-known --baselines none --splits softmax,relu,max,linear,taylor \
                --temperatures 0.1,1.0 --first-token-rule both --out $OUT/tuning-known ;;
  tune-ioi) $EVAL --protocol tokens --dataset ioi --size 20 --tuning-slice \
                --exclude $OUT/tokens-ioi --baselines none --splits softmax,relu,max,linear,taylor \
                --temperatures 0.1,1.0 --first-token-rule both --out $OUT/tuning-ioi ;;
  # The margin variants (the answer's logit minus the runner-up token's, or, IOI, minus
  # the other name's), on the tuning slice only: they lose there, so the test runs keep
  # the plain variants.
  tune-margin)
    $EVAL --protocol tokens --dataset known --size 30 --tuning-slice --exclude $OUT/tokens-known \
      --baselines none --splits softmax,taylor --margin both --out $OUT/tuning-known-margin
    $EVAL --protocol tokens --dataset ioi --size 20 --tuning-slice --exclude $OUT/tokens-ioi \
      --baselines none --splits softmax,taylor --margin both --out $OUT/tuning-ioi-margin ;;
  tune-margin-name)
    $EVAL --protocol tokens --dataset ioi --size 20 --tuning-slice --exclude $OUT/tokens-ioi \
      --baselines none --splits softmax,taylor --margin on --margin-against other-name \
      --out $OUT/tuning-ioi-margin-name ;;
  # The paper's protocols as its public scripts run them (--rules paper): every prompt in
  # file order, floor counts, re-tokenised edits, log-prob gradients, 100-step IG.
  paper-tokens-known) $EVAL --rules paper --protocol tokens --dataset known --size 200 --out $OUT/paper-tokens-known ;;
  paper-tokens-ioi) $EVAL --rules paper --protocol tokens --dataset ioi --size 200 --out $OUT/paper-tokens-ioi ;;
  paper-tokens-longra) $EVAL --rules paper --protocol tokens --dataset longra --size 100 --out $OUT/paper-tokens-longra ;;
  paper-tokens) for g in paper-tokens-known paper-tokens-ioi paper-tokens-longra; do bash "$0" "$MODEL" $g; done ;;
  paper-components) $EVAL --rules paper --protocol components --dataset counterfact --size 100 --out $OUT/paper-components-counterfact
                    $EVAL --rules paper --protocol components --dataset ioi-component --size 100 --out $OUT/paper-components-ioi ;;
  paper-truth) $EVAL --rules paper --protocol truth --size 50 --out $OUT/paper-truth ;;
  paper-language) $EVAL --rules paper --protocol language --size 50 --probe-size 600 --out $OUT/paper-language ;;
  # the peers (make peers) on the paper-mode prompts, DePass's default beside them
  paper-peers-known) $EVAL --rules paper --protocol tokens --dataset known --size 200 --splits softmax \
                       --baselines none --peers attnlrp,context-cite --out $OUT/paper-peers-known ;;
  paper-peers-ioi) $EVAL --rules paper --protocol tokens --dataset ioi --size 200 --splits softmax \
                     --baselines none --peers attnlrp,context-cite --out $OUT/paper-peers-ioi ;;
  paper-peers-longra) $EVAL --rules paper --protocol tokens --dataset longra --size 100 --splits softmax \
                        --baselines none --peers attnlrp,context-cite --out $OUT/paper-peers-longra ;;
  rest) for g in truth language tune-known tune-ioi; do bash "$0" "$MODEL" $g; done ;;
  # Rewrite every report from the rows there (e.g. after stopping the runs), and the
  # headline table of README.md.
  report)
    report_runs $OUT/*/
    runs=()
    for run in tokens-known tokens-ioi tokens-longra; do
      [ -f "$OUT/$run/results.json" ] && runs+=("$OUT/$run")
    done
    .venv/bin/python -m depass_eval.headline "${runs[@]}" > $OUT/headline.md
    side_by_side $OUT SmolLM2-135M-Instruct
    verdicts $OUT SmolLM2-135M-Instruct ;;
  *) echo "unknown group $GROUP"; exit 2 ;;
esac
