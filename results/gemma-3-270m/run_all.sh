#!/usr/bin/env bash
# The Gemma-3-270M runs of results/gemma-3-270m/ (issue 20; CPU, one torch thread each,
# niced: the machine is shared). Resumable: re-run a group to carry on.
# Usage: bash results/gemma-3-270m/run_all.sh "$(.venv/bin/python scripts/real_models.py path gemma3)" <group>
set -euo pipefail
cd "$(dirname "$0")/../.."
source results/report_runs.sh
MODEL=${1:?path to gemma-3-270m-q4_k_m.gguf}
GROUP=${2:-all}
OUT=results/gemma-3-270m
export GOMP_SPINCOUNT=20000 OMP_NUM_THREADS=1
EVAL="nice -n 10 .venv/bin/depass-eval --model $MODEL --threads 1 --seed 0 --no-progress"
case $GROUP in
  # protocol 1 in both modes: 100 Known_1000, 100 IOI, 50 LongRA
  paper-tokens-known) $EVAL --rules paper --protocol tokens --dataset known --size 100 --out $OUT/paper-tokens-known ;;
  paper-tokens-ioi) $EVAL --rules paper --protocol tokens --dataset ioi --size 100 --out $OUT/paper-tokens-ioi ;;
  paper-tokens-longra) $EVAL --rules paper --protocol tokens --dataset longra --size 50 --out $OUT/paper-tokens-longra ;;
  tokens-known) $EVAL --protocol tokens --dataset known --size 100 --out $OUT/tokens-known ;;
  tokens-ioi) $EVAL --protocol tokens --dataset ioi --size 100 --out $OUT/tokens-ioi ;;
  tokens-longra) $EVAL --protocol tokens --dataset longra --size 50 --out $OUT/tokens-longra ;;
  # protocol 3 in both modes: 50 CounterFact + 50 IOI
  paper-components) $EVAL --rules paper --protocol components --dataset counterfact --size 50 --out $OUT/paper-components-counterfact
                    $EVAL --rules paper --protocol components --dataset ioi-component --size 50 --out $OUT/paper-components-ioi ;;
  components) $EVAL --protocol components --dataset counterfact --size 50 --out $OUT/components-counterfact
              $EVAL --protocol components --dataset ioi-component --size 50 --out $OUT/components-ioi ;;
  # protocols 2 and 4 in paper mode: 20 prompts / facts each
  paper-truth) $EVAL --rules paper --protocol truth --size 20 --out $OUT/paper-truth ;;
  paper-language) $EVAL --rules paper --protocol language --size 20 --probe-size 600 --out $OUT/paper-language ;;
  paper-peers-known) $EVAL --rules paper --protocol tokens --dataset known --size 100 --splits softmax \
                       --baselines none --peers attnlrp,context-cite --out $OUT/paper-peers-known ;;
  paper-peers-ioi) $EVAL --rules paper --protocol tokens --dataset ioi --size 100 --splits softmax \
                     --baselines none --peers attnlrp,context-cite --out $OUT/paper-peers-ioi ;;
  paper-peers-longra) $EVAL --rules paper --protocol tokens --dataset longra --size 50 --splits softmax \
                        --baselines none --peers attnlrp,context-cite --out $OUT/paper-peers-longra ;;
  paper-tokens) for g in paper-tokens-known paper-tokens-ioi paper-tokens-longra; do bash "$0" "$MODEL" $g; done ;;
  all) for g in paper-tokens tokens-known tokens-ioi tokens-longra paper-components components paper-truth paper-language; do
         bash "$0" "$MODEL" $g; done ;;
  report)
    report_runs $OUT/*/
    side_by_side $OUT Gemma-3-270M
    verdicts $OUT Gemma-3-270M ;;
  *) echo "unknown group $GROUP"; exit 2 ;;
esac
