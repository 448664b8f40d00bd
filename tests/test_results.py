import hashlib
import json
import os
import time

import pytest
from helpers import row

from labkit import profiles, results


def test_record_replaces_same_key_and_keeps_others(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    results.record(row())
    results.record(row(method="GPTQ", setting="W4"))
    results.record(row(perplexity=21.0))  # re-run of the baseline
    rows = results.load_rows("cpu")
    assert [(r.method, r.perplexity) for r in rows] == [("GPTQ", 20.0), ("fp32", 21.0)]
    assert json.loads((tmp_path / "cpu.json").read_text())[0]["setting"] == "W4"
    assert results.load_rows("gpu") == []
    text = results.table(rows)
    assert "GPTQ" in text and "21.00" in text and "perplexity" in text.splitlines()[0]


def test_record_refuses_non_finite(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="perplexity=nan"):
        results.record(row(perplexity=float("nan")))


@pytest.mark.parametrize("content", ['[{"lesson": "00_baseline", "meth', "", "\xff\xfe", '{"a": 1}', '[{"lesson": 1}]'])
def test_corrupt_results_file_is_named_with_the_fix(tmp_path, monkeypatch, content):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    path = tmp_path / "cpu.json"
    path.write_bytes(content.encode("latin-1"))
    expected = rf"{path} is not a readable results file.*move it away or delete it"
    with pytest.raises(ValueError, match=expected):
        results.record(row())
    with pytest.raises(ValueError, match=expected):
        results.load_rows("cpu")
    assert path.read_bytes() == content.encode("latin-1")  # left as it was, for the learner to look at


@pytest.mark.parametrize(
    "field, value",
    [
        ("perplexity", 0.5),
        ("perplexity", "20"),
        ("tokens_per_s", -1.0),
        ("weight_bytes", None),
        ("params", True),
        ("seqlen", 0),
        ("seqlen", 512.0),
        ("eval_windows", 0),
        ("lesson", None),
        ("profile", "../../etc"),
        ("profile", ""),
        ("note", 3),
    ],
)
def test_record_names_a_bad_field_and_writes_nothing(tmp_path, monkeypatch, field, value):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=rf"Row\.{field}="):
        results.record(row(**{field: value}))
    assert list(tmp_path.iterdir()) == []


def test_record_refuses_what_is_not_a_row():
    with pytest.raises(ValueError, match=r"row must be a labkit\.results\.Row, got dict"):
        results.record({"lesson": "00_baseline"})


def test_check_reference_passes_fails_and_reports_incomparable():
    ref = results.reference("00_baseline/perplexity", "cpu")
    ok = results.check_reference("00_baseline/perplexity", ref["value"] * (1 + ref["rtol"] / 2), "cpu", "local:x")
    assert ok.startswith("OK 00_baseline/perplexity") and str(ref["value"]) in ok
    with pytest.raises(AssertionError, match="measured 40, but the cpu-profile reference"):
        results.check_reference("00_baseline/perplexity", 40.0, "cpu", "local:x")
    with pytest.raises(AssertionError):
        results.check_reference("00_baseline/perplexity", float("nan"), "cpu")
    msg = results.check_reference("00_baseline/perplexity", 40.0, "cpu", "hub:wikitext-2-raw-v1")
    assert msg.startswith("NOT CHECKED")
    with pytest.raises(KeyError, match="No reference number 'nope'"):
        results.check_reference("nope", 1.0, "cpu")


def test_every_reference_states_value_tolerance_and_origin():
    for key, per_profile in results.references().items():
        for profile, ref in per_profile.items():
            assert profile in ("cpu", "gpu"), key
            # CPU references are this code's own numbers: tight. A published GPU number may be the
            # perplexity of a broken model (plain SVD's 20061) that only its order of magnitude checks.
            limit = 0.05 if profile == "cpu" else 0.5
            assert ref["value"] > 0 and 0 < ref["rtol"] <= limit and ref["origin"], key


def test_check_reference_missing_ok_reports_a_profile_without_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    refs = tmp_path / "references.json"
    refs.write_text(json.dumps({"k": {"cpu": {"value": 10.0, "rtol": 0.01, "origin": "o"}}}))
    monkeypatch.setattr(results, "REFERENCES_FILE", refs)
    msg = results.check_reference("k", 12.3456, "gpu", missing_ok=True)
    assert msg == "no gpu-profile reference for k; measured 12.35"
    assert results.check_reference("k", 10.0, "cpu", missing_ok=True).startswith("OK k")
    with pytest.raises(AssertionError):
        results.check_reference("k", 12.0, "cpu", missing_ok=True)  # a reference that exists is checked
    with pytest.raises(KeyError, match="has no value for profile 'gpu'"):
        results.check_reference("k", 12.0, "gpu")
    with pytest.raises(KeyError, match="No reference number 'typo'"):
        results.check_reference("typo", 1.0, "cpu", missing_ok=True)  # an unknown key is a mistake, not a toy run


def test_record_run_fills_the_protocol_from_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    P = profiles.PROFILES["cpu"]
    got = results.record_run(
        P, "05_gptq", "GPTQ", "W4", params=10, weight_bytes=40, perplexity=20.0, data="local:x", eval_windows=8
    )
    assert results.load_rows("cpu") == [got]
    assert got == row(lesson="05_gptq", method="GPTQ", setting="W4", model=P.model, runtime_bytes=None,
                      tokens_per_s=None, eval_windows=8)  # fmt: skip
    other = results.record_run(
        P, "03_structured", "FLaP", "20%", params=1, weight_bytes=2, perplexity=None, data="hub:w", eval_windows=None,
        seqlen=128, runtime_bytes=3, tokens_per_s=4.5, device="cuda:0", note="n",
    )  # fmt: skip
    assert (other.seqlen, other.device, other.runtime_bytes, other.tokens_per_s) == (128, "cuda:0", 3, 4.5)
    with pytest.raises(TypeError):  # which windows the perplexity averaged must be said
        results.record_run(P, "05_gptq", "GPTQ", "W4", params=10, weight_bytes=40, perplexity=1.0, data="x")


def test_check_keeps_what_it_measured_and_never_writes_references(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path / "results"))
    refs = tmp_path / "references.json"
    refs.write_text(json.dumps({"k": {"cpu": {"value": 10.0, "rtol": 0.01, "origin": "o"}}}))
    monkeypatch.setattr(results, "REFERENCES_FILE", refs)
    before = refs.read_text()
    with pytest.raises(AssertionError):
        results.check_reference("k", 12.345678, "cpu", "local:x")
    assert results.check_reference("k", 10.01, "cpu", "hub:w").startswith("OK k")
    assert refs.read_text() == before  # a check only checks
    assert results.measured("cpu") == {"k": {"key": "k", "value": 10.01, "data": "hub"}}  # the last one wins
    assert results.measured("gpu") == {}


def test_update_references_writes_measured_cpu_values_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path / "results"))
    refs = tmp_path / "references.json"
    published = {"value": 5.68, "rtol": 0.01, "origin": "paper"}
    old = {"value": 3.0, "rtol": 0.03, "origin": "o"}
    refs.write_text(json.dumps({"05/k": {"gpu": published}, "06/old": {"cpu": old}}))
    monkeypatch.setattr(results, "REFERENCES_FILE", refs)
    with pytest.raises(LookupError, match="No measured CPU-profile values"):
        results.update_references()
    for key, value in (("05/k", 12.345678), ("06/old", 3.5), ("07/other", 1.0)):
        with pytest.raises((AssertionError, KeyError)):  # no CPU reference yet, or outside it
            results.check_reference(key, value, "cpu", "local:x")
    with pytest.raises(AssertionError):
        results.check_reference("05/k", 6.0, "gpu")  # measured on the GPU profile: never written
    changes = results.update_references(["05", "06"])
    assert changes == [("05/k", None, 12.3457), ("06/old", 3.0, 3.5)]
    stored = json.loads(refs.read_text())
    assert stored["05/k"] == {
        "gpu": published,  # published numbers are never overwritten
        "cpu": {"value": 12.3457, "rtol": 0.02, "origin": "measured by this code", "data": "local"},
    }
    assert stored["06/old"]["cpu"] == {**old, "value": 3.5, "data": "local"}  # keeps its tolerance and origin
    assert "07/other" not in stored
    assert results.check_reference("05/k", 12.3457, "cpu", "local:x").startswith("OK 05/k")
    with pytest.raises(LookupError):
        results.update_references(["05"], since=time.time() + 60)  # nothing measured since


def test_measure_only_mode_keeps_values_and_compares_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv(results.MEASURE_ONLY_ENV, "1")
    msg = results.check_reference("00_baseline/perplexity", 1e9, "cpu", "local:x")  # far off: no error
    assert msg.startswith("MEASURED 00_baseline/perplexity: 1e+09 on the cpu profile")
    assert results.check_reference("new/key", 2.5, "cpu").startswith("MEASURED new/key")  # no reference yet
    assert set(results.measured("cpu")) == {"00_baseline/perplexity", "new/key"}


def test_course_update_references_measures_in_a_kernel_then_stores(tmp_path, monkeypatch, capsys):
    """The measuring run's kernel gets the measure-only switch (this process does not), then the
    command writes references.json and re-runs the lesson in place, where the check now passes."""
    import nbformat

    from labkit import course

    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("LABKIT_PROFILE", "cpu")
    refs = tmp_path / "references.json"
    refs.write_text(json.dumps({"99/k": {"cpu": {"value": 1.0, "rtol": 0.01, "origin": "o"}}}))
    monkeypatch.setattr(results, "REFERENCES_FILE", refs)
    lesson = tmp_path / "99_toy.ipynb"
    code = (
        "import json, os\nfrom pathlib import Path\nfrom labkit import results\n"
        f"results.REFERENCES_FILE = Path({str(refs)!r})\n"
        "print(results.check_reference('99/k', 2.0, 'cpu', 'local:x'))"
    )
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), lesson)
    monkeypatch.setattr(course, "lessons", lambda select=None: [lesson])
    course.main(["--update-references", "--out", str(tmp_path / "executed"), "99"])
    assert results.MEASURE_ONLY_ENV not in os.environ
    measured_copy = nbformat.read(tmp_path / "executed" / lesson.name, as_version=4)
    assert measured_copy.cells[0].outputs[0]["text"].startswith("MEASURED 99/k: 2 on the cpu profile")
    assert json.loads(refs.read_text())["99/k"]["cpu"]["value"] == 2.0
    assert nbformat.read(lesson, as_version=4).cells[0].outputs[0]["text"].startswith("OK 99/k")  # stored in place
    assert "99/k: 1.0 -> 2.0" in capsys.readouterr().out


def test_store_measured_command_writes_without_running(tmp_path, monkeypatch, capsys):
    from labkit import course

    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path / "results"))
    refs = tmp_path / "references.json"
    refs.write_text(json.dumps({"01/k": {"cpu": {"value": 2.0, "rtol": 0.01, "origin": "o"}}}))
    monkeypatch.setattr(results, "REFERENCES_FILE", refs)
    monkeypatch.setattr(course, "execute", lambda *a, **kw: pytest.fail("--store-measured runs no lesson"))
    with pytest.raises(SystemExit, match="No measured CPU-profile values"):
        course.main(["--store-measured", "01"])
    results.check_reference("01/k", 2.01, "cpu", "local:x")
    course.main(["--store-measured", "01"])
    assert "01/k: 2.0 -> 2.01" in capsys.readouterr().out
    assert json.loads(refs.read_text())["01/k"]["cpu"]["value"] == 2.01


def test_require_returns_rows_in_order_and_names_what_is_missing():
    rows = [row(), row(lesson="05_gptq", method="GPTQ", setting="W4")]
    got = results.require(rows, [("05_gptq", "GPTQ", "W4"), ("00_baseline", "fp32", "-")])
    assert [r.lesson for r in got] == ["05_gptq", "00_baseline"]
    with pytest.raises(LookupError, match=r"1 result row\(s\) missing.*'07_distillation'.*labkit.course 07"):
        results.require(rows, [("00_baseline", "fp32", "-"), ("07_distillation", "KD", "6 layers")])


def test_pareto_front_keeps_only_undominated_rows():
    a = row(method="a", weight_bytes=100, perplexity=10.0)
    b = row(method="b", weight_bytes=50, perplexity=12.0)
    c = row(method="c", weight_bytes=60, perplexity=13.0)  # bigger and worse than b: dominated
    d = row(method="d", weight_bytes=20, perplexity=40.0)
    e = row(method="e", weight_bytes=10, perplexity=None)
    assert [r.method for r in results.pareto_front([a, b, c, d, e])] == ["d", "b", "a"]


def test_require_lessons_orders_by_lesson_and_names_missing_ones():
    rows = [row(lesson="05_gptq", method="GPTQ"), row(), row(lesson="05_gptq", method="RTN")]
    got = results.require_lessons(rows, ["00_baseline", "05_gptq"])
    assert [(r.lesson, r.method) for r in got] == [("00_baseline", "fp32"), ("05_gptq", "GPTQ"), ("05_gptq", "RTN")]
    with pytest.raises(LookupError, match=r"\['03_structured'\].*labkit.course 03"):
        results.require_lessons(rows, ["00_baseline", "03_structured"])


# --- protocols ------------------------------------------------------------------------------------------------


def test_protocol_fingerprint_is_short_stable_and_follows_every_field():
    P = profiles.PROFILES["cpu"]
    protocol = P.protocol(16, data="local:x").as_dict()
    key = profiles.fingerprint(protocol)
    assert len(key) == 8 and int(key, 16) >= 0
    # The canonical form, written out: a change of it would orphan every recorded row.
    canonical = (
        '{"bos":"none","calib_samples":8,"calib_seqlen":512,"calib_source":"WikiText-2 validation, random starts",'
        '"copy":"local","dataset":"WikiText-2 raw","dtype":"float32","eval_windows":16,"model":"smollm2-135m",'
        '"seqlen":512,"split":"test"}'
    )
    assert key == hashlib.sha256(canonical.encode()).hexdigest()[:8]
    assert profiles.fingerprint(dict(reversed(protocol.items()))) == key  # key order does not matter
    for name, value in protocol.items():
        changed = {**protocol, name: (value or 0) + 1 if isinstance(value, int) or value is None else value + "x"}
        assert profiles.fingerprint(changed) != key, name
    with pytest.raises(ValueError, match=r"protocol must be a dict with the keys"):
        profiles.fingerprint({k: v for k, v in protocol.items() if k != "bos"})


def test_profile_protocol_names_what_fixes_a_perplexity():
    P = profiles.PROFILES["cpu"]
    main, sweep = P.protocol(data="local:/a/b"), P.protocol("sweep", data="local:/c/d")
    assert (main.eval_windows, sweep.eval_windows, main.seqlen) == (P.eval_windows, P.sweep_windows, P.seqlen)
    assert main.as_dict() == {
        "model": "smollm2-135m", "dtype": "float32", "dataset": "WikiText-2 raw", "split": "test", "copy": "local",
        "eval_windows": 16, "seqlen": 512, "calib_samples": 8, "calib_seqlen": 512,
        "calib_source": "WikiText-2 validation, random starts", "bos": "none",
    }  # fmt: skip
    assert main.fingerprint != sweep.fingerprint and "/a/b" not in main.describe()  # no folder in a protocol
    assert P.protocol(data="hub:wikitext-2-raw-v1").copy == "hub"
    assert profiles.PROFILES["gpu"].protocol().as_dict()["eval_windows"] is None  # the whole split
    assert main.describe().startswith(f"protocol {main.fingerprint}: smollm2-135m float32;")
    assert "first 16 windows of 512 tokens" in main.describe()
    for bad in ("all", 0, True, 2.0, [16]):
        with pytest.raises(ValueError, match=r"eval_windows=.*allowed are 'eval', 'sweep'"):
            P.protocol(bad)
    with pytest.raises(ValueError, match=r"seqlen=1"):
        P.protocol(seqlen=1)
    with pytest.raises(ValueError, match=r"data=3"):
        P.protocol(data=3)


def test_record_run_stores_the_profiles_protocol_and_role(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    P = profiles.PROFILES["cpu"]
    kw = dict(params=10, weight_bytes=40, perplexity=20.0, data="local:/somewhere/wiki.test.raw")
    got = results.record_run(P, "06_x", "W8A16", "-", eval_windows=P.sweep_windows, **kw)
    expected = P.protocol("sweep", data="local:y")
    assert (got.protocol, got.fingerprint, got.role) == (expected.as_dict(), expected.fingerprint, "result")
    base = results.record_run(P, "06_x", "FP32", "-", eval_windows=P.sweep_windows, role="baseline", **kw)
    assert results.load_rows("cpu") == [got, base]  # the protocol survives the file
    with pytest.raises(ValueError, match=r"Row\.role='base'"):
        results.record_run(P, "06_x", "FP32", "-", eval_windows=8, role="base", **kw)


SAME = dict(protocol=row().protocol, fingerprint=row().fingerprint)  # ROW's protocol, kept while a column changes


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(protocol=None), r"Row\.protocol=None: a recorded result needs its whole protocol"),
        (dict(protocol={"model": "m"}), r"Row\.protocol=\['model'\]"),
        (dict(fingerprint="00000000"), r"Row\.fingerprint='00000000': the fingerprint of Row\.protocol is"),
        (dict(seqlen=128, **SAME), r"Row\.seqlen=128 disagrees"),
        (dict(eval_windows=8, **SAME), r"Row\.eval_windows=8 disagrees"),
        (dict(data="hub:w", **SAME), r"Row\.data='hub:w' disagrees"),
    ],
)
def test_record_refuses_a_row_whose_protocol_is_missing_or_wrong(tmp_path, monkeypatch, change, message):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        results.record(row(**change))
    assert list(tmp_path.iterdir()) == []


def test_pareto_front_refuses_rows_of_two_protocols_and_names_them():
    # The capstone's case: lesson 06 measured on 8 windows, the baseline on 16.
    fp32 = row(lesson="00_baseline", method="fp32", weight_bytes=513, perplexity=36.47, eval_windows=16)
    w8a16 = row(lesson="06_x", method="W8A16", weight_bytes=210, perplexity=30.47, eval_windows=8)
    with pytest.raises(ValueError, match=r"pareto_front: rows measured under 2 protocols cannot be compared") as err:
        results.pareto_front([fp32, w8a16])
    text = str(err.value)
    assert fp32.fingerprint in text and w8a16.fingerprint in text and "00_baseline" in text and "06_x" in text
    assert "eval_windows: 16 vs 8" in text and "results.by_protocol" in text
    with pytest.raises(ValueError, match=r"seqlen: 512 vs 128"):
        results.pareto_front([fp32, row(seqlen=128, eval_windows=16)])
    with pytest.raises(ValueError, match=r"copy: 'local' vs 'hub'"):
        results.baseline([fp32, row(data="hub:w", eval_windows=16)])
    # Within one protocol it compares; grouped, each protocol gets its own front.
    fp32_8 = row(lesson="06_x", method="FP32", weight_bytes=513, perplexity=30.51, eval_windows=8, role="baseline")
    groups = results.by_protocol([fp32, w8a16, fp32_8])
    assert list(groups) == [fp32.fingerprint, w8a16.fingerprint] and groups[w8a16.fingerprint] == [w8a16, fp32_8]
    assert [r.method for r in results.pareto_front(groups[w8a16.fingerprint])] == ["W8A16"]
    assert results.baseline(groups[w8a16.fingerprint]) is fp32_8
    assert results.baseline([fp32], missing_ok=True) is None
    with pytest.raises(LookupError, match=rf"No baseline .* protocol {fp32.fingerprint}"):
        results.baseline([fp32])
    assert results.pareto_front([]) == [] and results.one_protocol([]) is None


def test_original_format_rows_stay_off_the_front_and_are_marked():
    base = row(method="fp32", weight_bytes=513, perplexity=36.47, role="baseline")
    q41 = row(method="RTN", setting="W4 g32 float offset", weight_bytes=171, perplexity=36.47, role="original format")
    w4 = row(method="RTN", setting="W4 g64", weight_bytes=163, perplexity=48.46)
    assert results.pareto_front([base, q41, w4]) == [w4, base]  # q41 would dominate the baseline
    text = results.table([base, q41, w4])
    assert "W4 g32 float offset [original format]" in text and "- [baseline]" in text
    assert text.splitlines()[0].split()[-1] == "protocol" and text.count(base.fingerprint) == 3


def test_fine_tuned_rows_stay_off_the_front_and_are_marked():
    """A LoRA-recovered model (and its dense control) trained on WikiText-2 would dominate untrained rows."""
    base = row(method="fp32", weight_bytes=513, perplexity=36.47, role="baseline")
    w4 = row(method="AWQ", setting="W4 g64", weight_bytes=163, perplexity=43.36)
    qlora = row(method="AWQ + QLoRA", setting="W4 g64", weight_bytes=172, perplexity=36.06, role="fine-tuned")
    control = row(method="fp32 + LoRA", setting="dense", weight_bytes=513, perplexity=31.60, role="fine-tuned")
    assert results.pareto_front([base, w4, qlora, control]) == [w4, base]
    assert "W4 g64 [fine-tuned]" in results.table([qlora])
    with pytest.raises(ValueError, match=r"role='tuned'.*fine-tuned"):
        results.record(row(role="tuned"))


def test_rows_recorded_before_protocols_load_but_are_never_compared(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    old = {k: v for k, v in row().__dict__.items() if k not in ("protocol", "fingerprint", "role")}
    (tmp_path / "cpu.json").write_text(json.dumps([old, {**old, "lesson": "05_gptq"}]))
    rows = results.load_rows("cpu")
    assert [r.protocol for r in rows] == [None, None]
    assert results.table(rows).splitlines()[2].split()[-1] == "none"
    for compare in (results.pareto_front, results.by_protocol, results.baseline):
        with pytest.raises(ValueError, match=r"\['00_baseline', '05_gptq'\] were recorded without their protocol.*"
                                             r"labkit.course 00 05"):  # fmt: skip
            compare(rows)
    results.record(row(method="GPTQ"))  # recording beside them still works
    rows = results.load_rows("cpu")
    assert len(rows) == 3
    assert results.protocols(rows).splitlines() == [
        "none: recorded without a protocol (re-run them) (lessons 00, 05)",
        f"{profiles.Protocol(**rows[2].protocol).describe()} (lessons 00)",
    ]
