# Sourced by the run_all.sh scripts: report_runs RUN... rewrites each run folder's report
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
