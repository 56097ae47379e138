"""Experiment trackers besides TensorBoard (issue 36): `--config configs/loggers/wandb.yaml` as a user runs it, W&B
offline (no account): the scalars, the sample videos (GIFs with their caption) reach the W&B run, read back from the
offline run's own files; a resumed run (`--ckpt_path last`) continues the same W&B run. The same with a local MLflow
server; and the learning report's figures (scripts/learning_runs.py --tracker) in both."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")


def wandb_records(path: str) -> list:
    """The records of a W&B ``.wandb`` file (a LevelDB-style log of 32 KiB blocks after a 7-byte header, each record
    a ``wandb_internal_pb2.Record``), in order."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and version == 0, (ident, magic, version)
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # padding to the block's end
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start a record, MIDDLE / LAST continue it
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def history(path: str) -> list[dict]:
    rows = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
    return rows


def _fit(run, *extra):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    args = ["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/loggers/wandb.yaml", "--trainer.default_root_dir", str(run),
            "--data.init_args.shot_detector", "histogram", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--model.init_args.val_num_videos", "1", "--model.init_args.heldout_conditions", "2", *extra]
    return subprocess.run([VIDALIGN, *args], cwd=str(run.parent), env=env, capture_output=True, text=True, timeout=600)


def test_wandb_offline_receives_scalars_and_videos_and_a_resumed_run_continues_it(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    first = _fit(run, "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(runs) == 1 and not (run / "tb").exists()  # W&B in place of TensorBoard
    run_id = runs[0].rsplit("-", 1)[1]
    rows = history(glob.glob(os.path.join(runs[0], "*.wandb"))[0])
    keys = set().union(*rows)
    assert {"train/loss", "trainer/global_step", "val/loss"} <= keys, sorted(keys)
    videos = [(k, v) for row in rows for k, v in row.items() if k.startswith("val/samples/") and k.endswith("/videos")]
    assert videos, sorted(keys)
    key, video = videos[0]
    entry = video[0] if isinstance(video, list) else video
    assert "left: the real clip" in json.dumps(video) and os.path.isfile(os.path.join(runs[0], "files", entry.get("path", "")) if isinstance(entry, dict) and "path" in entry else "")
    assert glob.glob(os.path.join(runs[0], "files", "media", "videos", "**", "*.gif"), recursive=True)
    tables = [row for row in rows if "heldout/conditions/_type" in row]  # (a media value is flattened: <key>/_type, <key>/path, ...)
    assert [row["trainer/global_step"] for row in tables] == [0, 2], tables
    assert all(row["heldout/conditions/_type"] == "table-file" and row["heldout/conditions/nrows"] == 2 for row in tables), tables
    table = json.load(open(os.path.join(runs[0], "files", tables[-1]["heldout/conditions/path"])))
    assert table["columns"][:1] == ["condition"] and "denoising_loss" in table["columns"] and len(table["data"]) == 2
    # resume: the same W&B run goes on
    second = _fit(run, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"W&B: the resumed run logs to the W&B run {run_id}" in second.stdout + second.stderr
    runs2 = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(runs2) == 2 and all(r.endswith(run_id) for r in runs2)
    steps = [row["trainer/global_step"] for row in history(glob.glob(os.path.join(runs2[1], "*.wandb"))[0]) if "train/loss" in row]
    assert steps and max(steps) == 2  # (the third batch: global step counted from 0 in the logged rows)


def _mlflow_server(folder, port):
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=str(folder), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # (its own process group: the uvicorn child too)
    import time
    import urllib.request

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
    raise AssertionError("mlflow server did not come up")


def _rest(port, path, body=None):
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    return json.load(urllib.request.urlopen(req, timeout=30))


def test_mlflow_server_receives_scalars_and_video_artifacts_and_a_resumed_run_continues_it(tmp_path):
    """A local MLflow tracking server (SQLite store) started here; `--config configs/loggers/mlflow.yaml` with
    MLFLOW_TRACKING_URI pointing at it; the metrics and artifacts read back through the server's REST API."""
    pytest.importorskip("mlflow")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "server").mkdir()
    server = _mlflow_server(tmp_path / "server", port)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "1"}
        run = tmp_path / "run"

        def fit(*extra):
            args = ["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/loggers/mlflow.yaml", "--trainer.default_root_dir", str(run),
                    "--data.init_args.shot_detector", "histogram", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--model.init_args.val_num_videos", "1", "--model.init_args.heldout_conditions", "2", *extra]
            return subprocess.run([VIDALIGN, *args], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)

        first = fit("--trainer.max_steps", "2")
        assert first.returncode == 0, first.stderr[-3000:]
        run_id = (run / "mlflow_run_id").read_text().strip()
        got = _rest(port, f"runs/get?run_id={run_id}")["run"]
        assert got["info"]["status"] == "FINISHED" and {m["key"] for m in got["data"]["metrics"]} >= {"train/loss", "val/loss"}
        loss = _rest(port, f"metrics/get-history?run_id={run_id}&metric_key=train/loss")["metrics"]
        assert sorted(m["step"] for m in loss) == [0, 1]
        samples = _rest(port, f"artifacts/list?run_id={run_id}&path=val/samples")["files"]
        assert samples, "no sample artifacts"
        files = _rest(port, f"artifacts/list?run_id={run_id}&path={samples[0]['path']}")["files"]
        assert {os.path.basename(f["path"]) for f in files} == {"step2.gif", "step2.txt"}
        tables = {os.path.basename(f["path"]) for f in _rest(port, f"artifacts/list?run_id={run_id}&path=heldout")["files"]}
        assert tables == {"conditions_step0.json", "conditions_step2.json"}, tables  # the held-out rows of each evaluation
        # resumed with a changed setting (extending the schedule, as docs/resume.md says): MLflow refuses to change a
        # parameter; the new value is logged beside the first
        second = fit("--trainer.max_steps", "3", "--ckpt_path", "last", "--model.init_args.lr_scheduler.init_args.total_steps", "50")
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"MLflow: the resumed run logs to the MLflow run {run_id}" in second.stdout + second.stderr
        loss = _rest(port, f"metrics/get-history?run_id={run_id}&metric_key=train/loss")["metrics"]
        assert sorted(m["step"] for m in loss) == [0, 1, 2]  # the same run, continued
        runs = _rest(port, "runs/search", {"experiment_ids": [got["info"]["experiment_id"]]})["runs"]
        assert len(runs) == 1
        params = {p["key"]: p["value"] for p in _rest(port, f"runs/get?run_id={run_id}")["run"]["data"]["params"]}
        changed = [k for k in params if k.endswith("total_steps:resume1")]
        assert len(changed) == 1 and params[changed[0]] == "50" and params[changed[0].split(":")[0]] == "40", changed
    finally:
        import signal

        os.killpg(server.pid, signal.SIGKILL)  # `mlflow server` and the uvicorn worker it starts
        server.wait()


def test_mlflow_without_a_tracking_uri_is_one_clear_error(monkeypatch):
    pytest.importorskip("mlflow")
    from lightning_vidalign.trackers import MLFlowLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"set MLFLOW_TRACKING_URI .*sqlite:///runs/mlflow.db"):
        MLFlowLogger(experiment_name="x", tracking_uri=None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/set-after-import.db")  # read at construction, not at import
    assert MLFlowLogger(experiment_name="x", tracking_uri=None)._tracking_uri == "sqlite:////tmp/set-after-import.db"


def test_learning_report_figures_and_table_reach_a_wandb_offline_run_and_an_mlflow_run(tmp_path):
    """`scripts/learning_runs.py --report-only --tracker wandb|mlflow`, as a user runs it: the learning figures drawn from
    the kept results reach a W&B offline run (its image files and the table, read from the run folder) and an MLflow run
    (its artifacts, listed through MLflow's client on the SQLite store)."""
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    shutil.copytree(os.path.join(ROOT, "docs", "results"), report / "results")
    script = [sys.executable, os.path.join(ROOT, "scripts", "learning_runs.py"), "--report-only", "--recipes", "sft", "--out", str(tmp_path / "out"),
              "--report", str(report)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "w"), "WANDB_PROJECT": "report-test"}
    (tmp_path / "w").mkdir()
    done = subprocess.run([*script, "--tracker", "wandb"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = sorted(os.path.splitext(f)[0] for f in os.listdir(report / "figures"))
    assert "sft" in figures and "flow_grpo" in figures, figures  # every kept recipe's figure
    (run,) = glob.glob(str(tmp_path / "w" / "wandb" / "offline-run-*"))
    images = glob.glob(os.path.join(run, "files", "media", "images", "figures", "*.png"))
    assert sorted({os.path.basename(p).rsplit("_", 2)[0] for p in images}) == figures
    assert open(os.path.join(run, "files", "learning.md")).read() == open(report / "learning.md").read()
    (record,) = glob.glob(os.path.join(run, "*.wandb"))
    logged = {k: v for row in history(record) for k, v in row.items()}  # (a media value is flattened: <key>/_type, <key>/path, ...)
    assert all(logged.get(f"figures/{f}/_type") == "image-file" and os.path.isfile(os.path.join(run, "files", logged[f"figures/{f}/path"])) for f in figures)

    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([*script, "--tracker", "mlflow"], cwd=str(tmp_path), env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split("report sent to MLflow run ")[1].split()[0]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.run_name == "learning-report"
    assert sorted(os.path.splitext(os.path.basename(a.path))[0] for a in client.list_artifacts(run_id, "figures")) == figures
    assert [a.path for a in client.list_artifacts(run_id) if not a.is_dir] == ["learning.md"]
    missing = subprocess.run([*script, "--tracker", "mlflow"], cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "set MLFLOW_TRACKING_URI" in missing.stderr
