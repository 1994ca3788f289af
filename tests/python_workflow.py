#!/usr/bin/env python3
"""The data scientist's workflow, scripted: train a LightGBM model in Python on the
point-in-time table that `nudge-train export` writes, and save it for Nudge.

    .tools/pyenv/bin/python tests/python_workflow.py TABLE.csv OUT_MODEL.txt

The table has the FeatureSpec's columns (empty = missing), `label`, `split` (train, valid,
test by time), `time` and `person`. The model trains on `train`, stops early on `valid`,
and keeps the FeatureSpec column names, so `nudge manifest` can read them from the file.
scripts/python_workflow.sh runs the whole workflow and compares the result with the
Rust-trained model on the same test rows.
"""
import csv
import sys

import lightgbm as lgb
import numpy as np


def load(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        features = header[: header.index("label")]
        rows = {"train": [], "valid": [], "test": []}
        for record in reader:
            values = [float(v) if v else np.nan for v in record[: len(features)]]
            rows[record[header.index("split")]].append((values, int(record[header.index("label")])))
    parts = {k: (np.array([r[0] for r in v]), np.array([r[1] for r in v])) for k, v in rows.items()}
    return features, parts


def main(table, out):
    features, parts = load(table)
    (xt, yt), (xv, yv) = parts["train"], parts["valid"]
    params = dict(objective="binary", metric="binary_logloss", learning_rate=0.05, num_leaves=31,
                  min_data_in_leaf=50, seed=42, deterministic=True, force_col_wise=True,
                  num_threads=2, verbose=-1)
    train = lgb.Dataset(xt, yt, feature_name=features)
    valid = lgb.Dataset(xv, yv, reference=train)
    booster = lgb.train(params, train, num_boost_round=400, valid_sets=[valid],
                        callbacks=[lgb.early_stopping(30, verbose=False)])
    booster.save_model(out, num_iteration=booster.best_iteration)
    print(f"python: trained on {len(yt)} rows, best iteration {booster.best_iteration}, saved {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
