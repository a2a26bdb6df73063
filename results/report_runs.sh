# Sourced by the run_all.sh scripts. report_runs RUN... rewrites each run folder's report
# from its rows with $EVAL (depass-eval and its model), under the protocol, data set and
# rules its run.json records; folders without a run.json are skipped.
report_runs() {
  local run protocol dataset rules
  for run in "$@"; do
    [ -f "$run/run.json" ] || continue
    read -r protocol dataset rules < <(.venv/bin/python -c \
      "import json,sys; i=json.load(open(sys.argv[1])); print(i['protocol'], i['dataset'], i.get('rules', 'strict'))" "$run/run.json")
    $EVAL --rules "$rules" --protocol "$protocol" --dataset "$dataset" --out "$run" --report-only
  done
}

# side_by_side OUT MODEL_NAME writes OUT/side-by-side-{known,ioi,longra}.md: each token
# data set under both rules (strict tokens-X beside paper-tokens-X), where both ran.
side_by_side() {
  local out=$1 name=$2 data title
  for data in known ioi longra; do
    [ -f "$out/tokens-$data/results.json" ] && [ -f "$out/paper-tokens-$data/results.json" ] || continue
    case $data in known) title=Known_1000 ;; ioi) title=IOI ;; longra) title=LongRA ;; esac
    {
      echo "# $title under both rules ($name)"
      echo
      echo "Strict: prompts the model answers correctly (seeded order). Paper: the first prompts" \
        "of the file in order, answered or not. AUC ± standard error over prompts; n is the" \
        "prompts done so far."
      echo
      .venv/bin/python -m depass_eval.headline --side-by-side "$out/tokens-$data" "$out/paper-tokens-$data"
    } > "$out/side-by-side-$data.md"
  done
}

# verdicts OUT MODEL_NAME writes OUT/verdicts.md: per token run (both rules, and the
# peers), DePass's best variant against every other method on each curve.
verdicts() {
  local out=$1 name=$2 runs=() run
  for run in "$out"/tokens-{known,ioi,longra} "$out"/paper-tokens-{known,ioi,longra} "$out"/paper-peers-{known,ioi,longra}; do
    [ -f "$run/results.json" ] && runs+=("$run")
  done
  [ ${#runs[@]} -gt 0 ] || return 0
  {
    echo "# DePass against each method ($name)"
    echo
    echo "Per run and curve: DePass's best variant against every other method, best first." \
      "Patch-top: higher is better; recover-top: lower is better. A gap inside twice the" \
      "standard error of the difference is a tie."
    echo
    .venv/bin/python -m depass_eval.headline --verdicts "${runs[@]}"
  } > "$out/verdicts.md"
}
