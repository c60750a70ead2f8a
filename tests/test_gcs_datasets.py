"""gs:// datasets: validate_dataset reads them through the real google-cloud-storage client.

The client talks to a local storage emulator (STORAGE_EMULATOR_HOST), never to the network.
"""
from __future__ import annotations

import json

from components.common import storage
from components.validate_dataset.validator import run_validation


def test_validation_reads_gs_uris(gcs_emulator, tmp_path, tiny_model_dir, sample_dir):
    train_uri = gcs_emulator.uri("data/train.jsonl")
    eval_uri = gcs_emulator.uri("data/eval.jsonl")
    storage.write_bytes(train_uri, (sample_dir / "support_intents_train.jsonl").read_bytes())
    storage.write_bytes(eval_uri, (sample_dir / "support_intents_eval.jsonl").read_bytes())

    report = run_validation(train_uri, eval_uri, "text", str(tiny_model_dir), "", tmp_path / "out")
    assert report.valid
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == (sample_dir / "support_intents_train.jsonl").read_bytes()
    assert len((tmp_path / "out" / "eval.jsonl").read_text().splitlines()) == 60


def test_bad_gs_data_is_reported_with_the_uri_and_line(gcs_emulator, tmp_path, tiny_model_dir, sample_dir):
    lines = (sample_dir / "support_intents_train.jsonl").read_text().splitlines()[:20]
    lines[6] = json.dumps({"input_text": "hello"})  # line 7 lacks output_text
    uri = gcs_emulator.uri("bad/train.jsonl")
    storage.write_text(uri, "\n".join(lines) + "\n")

    report = run_validation(uri, "", "text", str(tiny_model_dir), "", tmp_path / "out")
    assert not report.valid
    assert f"{uri}:7: output_text:" in json.dumps(report.to_dict())
    assert not (tmp_path / "out").exists()  # nothing half-written for invalid data
