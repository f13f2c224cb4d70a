"""config.wandb: process 0 mirrors metrics.jsonl (same names, same steps) and the run config to W&B;
a project set without wandb installed is a ConfigError naming the `wandb` extra.

The run is W&B offline in a temporary folder; its history is read back from the run's .wandb file
(a leveldb-style log of protobuf records, which the wandb package writes but no longer reads)."""

import glob
import json
import os
import sys

import pytest

from core_jax import trainer, wandb_log
from core_jax.config import ConfigError, validate
from tests.toy_task import make_toy_task, toy_config

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32768  # the log's block size; a record header is 7 bytes: crc32, length (LE 16), type


def wandb_records(path: str):
    data = open(path, "rb").read()
    pos, pending = 7, b""  # after the file header
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_offline_run_has_the_metrics_rows_and_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    config = toy_config(total_steps=2, checkpoint_every=1000, **{"wandb.project": "recipes"})
    workdir = str(tmp_path / "run")
    trainer.train(config, workdir, make_toy_task(config), log_fn=lambda s: None)
    import wandb  # the wandb extra; importorskip above

    wandb.teardown()  # the run's file is complete once wandb's service process has stopped

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    (log,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    history, run_config = [], None
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "run":
            run_config = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.run.config.update
            }
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for row, logged in zip(rows, history):
        assert {k: v for k, v in logged.items() if not k.startswith("_")} == {
            k: pytest.approx(v) for k, v in row.items() if k != "step"
        }
    assert run_config["total_steps"] == 2 and run_config["wandb"]["project"] == "recipes"
    assert run_config["optim"]["learning_rate"] == config.optim.learning_rate


def test_no_wandb_run_without_a_project(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # off must not even import it
    assert wandb_log.start(toy_config(), str(tmp_path)) is None
    assert not os.listdir(tmp_path)


def test_project_without_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install '\.\[wandb\]'"):
        validate(toy_config(**{"wandb.project": "p"}), 8)
    validate(toy_config(), 8)  # off: wandb is never imported
    with pytest.raises(ConfigError, match="config.wandb.mode must be one of"):
        validate(toy_config(**{"wandb.project": "p", "wandb.mode": "offlin"}), 8)
