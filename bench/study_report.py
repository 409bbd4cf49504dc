"""One report over several studies: the configurations of all of them, and McNemar tests of the best one
against every other, on the questions they share.

    WORKBENCH_HOME=... .venv/bin/python bench/study_report.py 2 3

Use it when a study is extended by a second one (more seeds for the best configurations of the first):
cells with the same configuration label pool their seeds, as they would within one study. Last line:
``best_configuration_accuracy: <percent>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("studies", type=int, nargs="+")
    args = parser.parse_args()

    from core.study import analyse, mcnemar, tables_markdown
    from jobs.service import JobService

    service = JobService()
    results = [r for study_id in args.studies for r in service.study_results(study_id)]
    analysis = analyse(results)
    print(tables_markdown(analysis))
    best_accuracy = 0.0
    for bench, a in analysis.items():
        best = a["configs"][0]
        best_accuracy = max(best_accuracy, best["mean"])
        by_config: dict[str, dict[int, list[bool]]] = {}
        for r in results:
            if r.benchmark == bench:
                by_config.setdefault(r.coordinates["config"], {})[r.coordinates["seed"]] = r.correct
        print(f"McNemar, `{best['config']}` against each other configuration ({bench}), on the seeds both ran:\n")
        print("| configuration | seeds | best right, it wrong | it right, best wrong | exact p |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for s in a["configs"][1:]:
            seeds = sorted(set(by_config[best["config"]]) & set(by_config[s["config"]]))
            ours = [x for seed in seeds for x in by_config[best["config"]][seed]]
            theirs = [x for seed in seeds for x in by_config[s["config"]][seed]]
            t = mcnemar(ours, theirs)
            print(f"| {s['config']} | {len(seeds)} | {t['n10']} | {t['n01']} | {t['p_value']:.3g} |")
        print()
    service.close()
    print(f"best_configuration_accuracy: {100 * best_accuracy:.1f}")


if __name__ == "__main__":
    main()
