"""benchmarks/vs_mamba_ssm.py on CPU with the stand-in peer (tests/fake_peer/): the whole pipeline
in --smoke, the rows it writes (schema, one call_id, the peer's records converted), the budget
and the peer's time limit, and the report (table, plot, same-call check)."""

import json

import pytest

from benchmarks import vs_mamba_ssm as vs
from benchmarks import vs_mamba_ssm_report as report


def _case(row):
    return (row["what"], row["system"], row.get("model"), row.get("shape"), row.get("steps"))


@pytest.mark.slow
def test_smoke_run_writes_one_call_of_rows_and_the_report(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "vs.json"
    doc = vs.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == doc
    assert doc["smoke"] and not doc["failed"] and not doc["skipped"], (doc["failed"], doc["skipped"])
    assert doc["command"] == f"python3 -m benchmarks.vs_mamba_ssm --smoke --out {out}"
    report.validate(doc)
    assert {r["call_id"] for r in doc["rows"]} == {doc["call_id"]}
    cases = {_case(r) for r in doc["rows"]}
    expected = {("ssd", s, None, shape, None) for s in report.SYSTEMS for shape in vs.SHAPE_NAMES}
    expected |= {("train_step", "dimba_jax", "dimba_base", None, None),
                 ("train_step", "dimba_jax", "ar_base", None, None),
                 ("train_step", "mamba_ssm", "mamba2_130m", None, None),  # not its 370m record
                 ("generate_1024_b1", "mamba_ssm", "mamba2_130m", None, 1024),
                 ("generate_1024_b1", "dimba_jax", "dimba_base", None, 2),
                 ("generate_1024_b1", "dimba_jax", "dimba_base", None, 1),
                 ("generate_1024_b1", "dimba_jax", "ar_base", None, 16)}
    assert cases == expected and len(doc["rows"]) == len(expected)
    rows = {_case(r): r for r in doc["rows"]}
    # the stand-in's 130m-L2k: do_bench 1.0 / 4.0 ms, wall5 1.5 / 3.5 ms -> best per column
    peer = rows[("ssd", "mamba_ssm", None, "130m-L2k", None)]
    assert (peer["fwd_ms"], peer["fwdbwd_ms"]) == (1.0, 3.5)
    ours = rows[("ssd", "dimba_jax", None, "130m-L2k", None)]
    assert ours["detail"]["resolved_impl"] == "xla" and ours["fwd_ms"] > 0
    # the SSD runs with ssd()'s own kernels (the dt prologue kernel where no gradient is taken)
    assert ours["detail"]["kernels"].startswith("default: KernelConfig(")
    assert "prologue='auto'" in ours["detail"]["kernels"]
    train = rows[("train_step", "dimba_jax", "ar_base", None, None)]
    assert train["detail"]["config"] == "configs/ar_base.py" and train["tokens_per_s"] > 0
    assert train["mfu"] is None  # CPU: no peak
    # the decode stand-in waits 60 s after the one case needed: it was stopped, not waited for
    runs = {r["script"]: r for r in doc["peer_runs"]}
    assert runs["anchor_ar_decode_torch.py"]["stopped"] == "had every case it is needed for"
    assert runs["anchor_ar_decode_torch.py"]["wall_s"] < 30

    table, png = report.main(["--results", str(out), "--plot", str(tmp_path / "vs.png")])
    md = open(table).read()
    assert md.startswith("# dimba_jax beside mamba_ssm on cpu") and "SMOKE RUN" in md
    assert "| 130m-L2k | " in md and "| 1.000 | " in md and doc["call_id"] in md
    ratio = ours["fwd_ms"] / peer["fwd_ms"]
    verdict = "yes" if ratio <= 0.5 else "no"  # CPU timings of a tiny shape: either can happen
    assert f"| SSD 130m-L2k fwd: ours / mamba_ssm | {ratio:.3f} | <= 0.5 | {verdict} |" in md
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_write_over_a_results_file(tmp_path):
    out = tmp_path / "vs.json"
    out.write_text("{}")
    with pytest.raises(FileExistsError, match="never merged"):
        vs.main(["--smoke", "--out", str(out)])


def test_items_past_the_budget_are_skipped_with_a_note(tmp_path):
    doc = vs.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path / "vs.json")])
    assert doc["rows"] == [] and not doc["failed"]
    assert [s["item"] for s in doc["skipped"]] == list(vs.ITEM_SECONDS)


def test_parts_run_in_the_order_given(tmp_path):
    """--parts generate,ssd,generate: the generation items first, the SSD's after, once each
    (seen in the order a zero budget skips them)."""
    doc = vs.main(["--smoke", "--budget-s", "0", "--parts", "generate,ssd,generate",
                   "--out", str(tmp_path / "vs.json")])
    skipped = [s["item"] for s in doc["skipped"]]
    gen = [i for i in vs.ITEM_SECONDS if i.startswith("generate")]
    ssd = [i for i in vs.ITEM_SECONDS if i.startswith("ssd")]
    assert gen and ssd and skipped == gen + ssd


def test_a_peer_script_is_stopped_at_its_time_limit(tmp_path):
    args = vs.parse_args(["--smoke", "--peer-max-s", "1", "--out", str(tmp_path / "vs.json")])
    call = vs.Call(args, [])
    records = vs.run_peer(call, "generate", lambda recs: False)
    assert len(records) == 1 and records[0]["gen"] == 1024  # the non-JSON line is not a record
    run = call.doc["peer_runs"][-1]
    assert run["stopped"] == "time limit" and run["wall_s"] < 10


def test_peer_records_become_rows():
    rec = {"name": "1.3b-L2k", "fwd_ms": 0.56, "fwdbwd_ms": 3.9, "fwd_ms_wall5": 0.6,
           "fwdbwd_ms_wall5": 3.24}
    for how, want in (("do_bench", (0.56, 3.9)), ("wall5", (0.6, 3.24)), ("best", (0.56, 3.24))):
        (row,) = vs.peer_ssd_rows([rec, {"name": "other"}], how)
        assert (row["fwd_ms"], row["fwdbwd_ms"]) == want and row["shape"] == "1.3b-L2k"
    train = [{"model": "130m", "L": 1024, "step_ms": 186.3, "tokens_per_s": 88000.0},
             {"model": "370m", "L": 1024, "step_ms": 365.0, "tokens_per_s": 44900.0}]
    (row,) = vs.peer_train_rows(train, peak=1e15)
    assert row["mfu"] == pytest.approx(88000.0 * vs.peer_train_flops_per_token(1024) / 1e15)
    decode = [{"model": "130m", "batch": 1, "gen": 256, "ar_decode_ms": 300.0},
              {"model": "130m", "batch": 1, "gen": 1024, "ar_decode_ms": 1148.0},
              {"model": "130m", "batch": 64, "gen": 1024, "ar_decode_ms": 2033.0}]
    (row,) = vs.peer_generate_rows(decode)
    assert (row["steps"], row["ms"]) == (1024, 1148.0)


def test_peer_flops_are_ar_base_with_the_peer_vocabulary():
    from dimba_jax.config import load_config_file
    from dimba_jax.train.tasks import make_task

    task = make_task(load_config_file("configs/ar_base.py"))
    assert task.vocab_size == 8192
    diff = vs.peer_train_flops_per_token(1024) - task.flops_per_token(1024)
    assert diff == pytest.approx(3 * 2 * 768 * (vs.PEER_VOCAB - 8192))


def _doc(*rows):
    base = {"device": "d", "command": "c", "call_id": "A", "rows": []}
    for r in rows:
        base["rows"].append(dict({"what": "ssd", "system": "dimba_jax", "shape": "130m-L2k",
                                  "fwd_ms": 1.0, "fwdbwd_ms": 2.0, "call_id": "A"}, **r))
    return base


def test_validate_refuses_rows_of_another_call_and_off_schema_rows():
    report.validate(_doc({}, {"system": "mamba_ssm"}))
    with pytest.raises(ValueError, match="another call"):
        report.validate(_doc({}, {"system": "mamba_ssm", "call_id": "B"}))
    with pytest.raises(ValueError, match="second row"):
        report.validate(_doc({}, {}))
    with pytest.raises(ValueError, match="fwdbwd_ms"):
        report.validate(_doc({"fwdbwd_ms": None}))
    with pytest.raises(ValueError, match="unknown shape"):
        report.validate(_doc({"shape": "130m-L4k"}))
    with pytest.raises(ValueError, match="not positive"):
        report.validate(_doc({"fwd_ms": 0.0}))
    train = {"what": "train_step", "model": "ar_base", "ms": 1.0, "tokens_per_s": 5.0, "mfu": None}
    report.validate(_doc(train))
    with pytest.raises(ValueError, match="unknown model"):
        report.validate(_doc(dict(train, model="gpt2")))


def test_the_command_names_the_output_folder_as_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--smoke", "--out", str(tmp_path / "vs.json")]
    call = vs.Call(vs.parse_args(argv), argv)
    assert call.doc["command"] == "python3 -m benchmarks.vs_mamba_ssm --smoke --out $OUT/vs.json"


def test_peer_versions_come_from_the_peer_folder(tmp_path):
    (tmp_path / "torch.py").write_text(
        "import types\n__version__ = '9.9'\n"
        "cuda = types.SimpleNamespace(get_device_name=lambda i: 'StandInGPU')\n")
    (tmp_path / "triton.py").write_text("__version__ = '8.8'\n")
    assert vs.peer_versions(str(tmp_path)) == {"torch": "9.9", "triton": "8.8", "gpu": "StandInGPU"}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('no torch in this stand-in')\n")
    assert "no torch in this stand-in" in vs.peer_versions(str(broken))["error"]
