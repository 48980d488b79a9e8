"""Honest streaming benchmarks (issue 19): the rotating set sized from the L3 read at run time, the
native read kernel against its PyTorch checksum, the machine facts in every bench JSON, and
`bench --e2e --peers` (its error path and its plot) with llama.cpp mocked. No timing is asserted."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends.reference import stream_read_ref
from dbquant.bench import cpu as bench
from dbquant.bench import kv as bench_kv
from dbquant.bench import machine, peers
from dbquant.errors import DbquantError
from tests.test_cli import run

needs_cpu = pytest.mark.skipif(not (cpu_backend.load_cpu() and hasattr(torch.ops.dbquant, "stream_read_cpu")),
                               reason="C++ extension not built")
MACHINE_FIELDS = {"cpu", "cores", "isa_flags", "isas", "l1d_bytes", "l2_bytes", "l3_bytes", "loadavg", "torch"}


def fake_sysfs(root, entries):
    """cpu0/cache/index{i}/{level,type,size} as the kernel writes them."""
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return str(root)


# ---- cache sizes and the rotating set ---------------------------------------------------------


def test_cache_sizes_from_sysfs(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                 (3, "Unified", "266240K")])
    assert machine.cache_sizes(root) == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 260 << 20, "source": "sysfs"}


def test_cache_sizes_fall_back_to_lscpu_totals_per_instance(tmp_path, monkeypatch):
    text = ("L1d cache:   98304 (2 instances)\nL1i cache:   65536 (2 instances)\n"
            "L2 cache:    4194304 (2 instances)\nL3 cache:    272629760 (1 instance)\n")
    monkeypatch.setattr(machine.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=text, stderr=""))
    got = machine.cache_sizes(str(tmp_path / "missing"))
    assert got == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 260 << 20, "source": "lscpu"}


def test_size_parser():
    assert [machine._size_bytes(s) for s in ("48K", "2048K", "260M", "1G", "272629760", "32 KiB")] == [
        48 << 10, 2 << 20, 260 << 20, 1 << 30, 272629760, 32 << 10]
    with pytest.raises(ValueError, match="not a cache size"):
        machine._size_bytes("big")


def test_stream_set_is_four_l3_capped_by_a_quarter_of_free_memory():
    l3 = 260 << 20
    s = machine.stream_set_bytes(l3, available=19 << 30)
    assert s["bytes"] == 4 * l3 and not s["capped_by_memory"] and s["l3_bytes"] == l3
    s = machine.stream_set_bytes(l3, available=2 << 30)
    assert s["bytes"] == 512 << 20 and s["capped_by_memory"]


def test_stream_set_reads_the_machine_or_states_its_default(monkeypatch):
    monkeypatch.setattr(machine, "cache_sizes", lambda: {"l1d": None, "l2": None, "l3": 8 << 20, "source": "sysfs"})
    s = machine.stream_set_bytes(available=None)
    assert s["l3_bytes"] == 8 << 20 and s["l3_source"] == "sysfs" and s["bytes"] <= 32 << 20
    monkeypatch.setattr(machine, "cache_sizes", lambda: {"l1d": None, "l2": None, "l3": None, "source": None})
    s = machine.stream_set_bytes(available=64 << 30)
    assert s == {"bytes": 4 * machine.DEFAULT_L3, "l3_bytes": machine.DEFAULT_L3, "l3_source": "default",
                 "mem_available": 64 << 30, "capped_by_memory": False}


def test_cpu_model_and_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512f avx512vbmi "
                    "avx512_vnni amx_tile\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert machine.cpu_model_and_flags(str(info)) == ("Test CPU 9000",
                                                      ["avx2", "fma", "avx512f", "avx512vbmi", "avx512_vnni",
                                                       "amx_tile"])


# ---- the native read kernel against its reference ---------------------------------------------


def test_stream_read_ref_is_the_xor_of_padded_words():
    b = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=torch.uint8)  # one word and a 2-byte tail
    word = int.from_bytes(bytes(range(1, 9)), "little", signed=True)
    assert stream_read_ref(b) == word ^ (9 | 10 << 8)
    assert stream_read_ref(torch.empty(0, dtype=torch.uint8)) == 0


@needs_cpu
@pytest.mark.parametrize("nbytes", [1, 7, 8, 9, 63, 65, 255, 257, 4095, 4097, 3 * 4096 + 5, 100_003])
def test_stream_read_every_isa_and_thread_count_matches_the_reference(nbytes):
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    want = stream_read_ref(buf)
    for isa in torch.ops.dbquant.cpu_isas():  # each path this CPU has, forced
        for threads in (1, 2, 3):
            assert cpu_backend.stream_read_cpu(buf, threads, isa) == want, (isa, threads)
    assert cpu_backend.stream_read_cpu(buf, 2) == want  # auto


@needs_cpu
def test_stream_read_reads_other_dtypes_raw_and_checks_inputs():
    x = torch.randn(3, 1001, generator=torch.Generator().manual_seed(0))  # float32, 12012 bytes
    assert cpu_backend.stream_read_cpu(x, 2) == stream_read_ref(x) == stream_read_ref(x.view(torch.uint8))
    with pytest.raises(DbquantError, match="contiguous"):
        cpu_backend.stream_read_cpu(x.t(), 1)
    with pytest.raises(DbquantError, match="threads must be in"):
        cpu_backend.stream_read_cpu(x, 0)
    with pytest.raises(RuntimeError, match="unknown isa"):
        cpu_backend.stream_read_cpu(x, 1, "sse9")


def test_rotation_cycles_through_distinct_copies():
    ws, each = bench._weights("fp32", 8, 16, 64, "stream", set_bytes=8 * 16 * 4 * 5)
    assert each == 8 * 16 * 4 and len(ws) == 5
    nxt = bench._rotation(ws)
    seen = [nxt().data_ptr() for _ in range(2 * len(ws))]
    assert len(set(seen[: len(ws)])) == len(ws) and seen[: len(ws)] == seen[len(ws):]  # all, then again
    assert bench._copies(each, "cache", 1 << 30) == 1


# ---- machine facts in every bench JSON ----------------------------------------------------------


def test_kernel_json_has_the_machine_and_the_stream_sizing(tmp_path, capsys):
    js = tmp_path / "k.json"
    code, out, _ = run(capsys, "bench", "--shapes", "16x64", "--m", "1", "--threads", "1", "--mode", "stream",
                       "--backends", "fp32,cpu", "--stream-mib", "1", "--json", js)
    assert code == 0 and "read bandwidth" in out
    data = json.loads(js.read_text())
    assert MACHINE_FIELDS <= set(data["environment"])
    for r in data["rows"]:
        assert r["rotating_bytes"] >= r["stream_set_bytes"] == 1 << 20  # the copies span the whole set
        assert r["peak_bw_gbps"] >= r["bandwidth_gbps"] > 0 and r["torch_bw_gbps"] > 0
        assert r["streamed"] is (r["rotating_bytes"] >= 2 * r["l3_bytes"])
        # related to the better of the bandwidths measured before and after the rows
        assert r["bandwidth_gbps"] == max(r["bw_before_gbps"], r["bw_after_gbps"])
        assert 0 < r["ms_min"] <= r["ms"] and r["gbps_best"] >= r["gbps"]
        assert r["peak_bw_best_gbps"] >= r["peak_bw_gbps"]
        assert r["pct_bw_best"] == pytest.approx(100 * r["gbps_best"] / r["peak_bw_best_gbps"], abs=0.11)


@pytest.mark.parametrize("kv", [False, True])
def test_e2e_json_has_the_machine(tmp_path, capsys, monkeypatch, kv):
    row = dict(engine="dbquant.runtime.decode", model="dbquant", lm_head="w8a8", threads=1, prompt_tokens=8,
               new_tokens=4, prefill_tok_s=10.0, decode_tok_s=5.0)
    monkeypatch.setattr(bench, "e2e_bench", lambda *a, **k: [dict(row)])
    monkeypatch.setattr(bench_kv, "e2e_kv_bench", lambda *a, **k: [dict(row, kv="fp")])
    monkeypatch.setattr(bench_kv, "budget_rows", lambda rows, b: [])
    monkeypatch.setattr(bench_kv, "checkpoint_bytes", lambda d: 0)
    js = tmp_path / "e.json"
    code, _, err = run(capsys, "bench", "--e2e", tmp_path, *(["--kv", "fp"] if kv else []), "--threads", "1",
                       "--json", js)
    assert code == 0, err
    data = json.loads(js.read_text())
    assert MACHINE_FIELDS <= set(data["environment"]) and data["rows"][0]["decode_tok_s"] == 5.0


# ---- --peers -----------------------------------------------------------------------------------


def test_peers_fail_clearly_without_llama_cpp(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DBQUANT_CACHE", str(tmp_path / "cache"))

    def no_source(root, version):
        raise RuntimeError("pip exited 1 after 3 s:\nERROR: No matching distribution (no network)")

    def must_not_run(*a, **k):
        raise AssertionError("dbquant's rows ran before llama.cpp was checked")

    monkeypatch.setattr(peers, "fetch_source", no_source)
    monkeypatch.setattr(bench, "e2e_bench", must_not_run)
    code, _, err = run(capsys, "bench", "--e2e", tmp_path, "--peers", "--threads", "1")
    assert code == 2
    assert "llama.cpp could not be found or built" in err and "No matching distribution" in err
    assert str(tmp_path / "cache" / "llama.cpp") in err
    code, _, err = run(capsys, "bench", "--peers")
    assert code == 2 and "--peers adds llama.cpp's rows to --e2e DIR" in err


def test_peers_missing_gguf_is_an_error_not_a_dropped_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peers, "build_llamacpp", lambda: {"root": tmp_path, "files": {}})

    def ggufs(prep, types, hf_dir, jobs=2):
        prep["files"] = {"Q4_0": {"path": tmp_path / "x.gguf"}, "Q2_K": {"error": "producing Q2_K: boom"}}
        return prep

    monkeypatch.setattr(peers, "make_ggufs", ggufs)
    monkeypatch.setattr("dbquant.cli.resolve_model", lambda name: tmp_path)
    code, _, err = run(capsys, "bench", "--e2e", tmp_path, "--peers", "--peer-types", "Q4_0,Q2_K")
    assert code == 2 and "Q2_K: producing Q2_K: boom" in err


@pytest.mark.parametrize("dies", [True, False])
def test_a_native_llama_cpp_that_dies_of_sigill_gives_way_to_the_no_amx_build(tmp_path, monkeypatch, dies):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n" + ("kill -ILL $$\n" if dies else "exit 0\n"))
    fake.chmod(0o755)
    built = []

    def build(root, tree, commit, jobs, rebuild, variant=""):
        built.append(variant)
        return {"variant": variant, "cmake_flags": [f"-DCMAKE_CXX_FLAGS={peers.NO_AMX}"]}

    monkeypatch.setattr(peers, "build", build)
    prep = {"root": tmp_path, "tree": tmp_path, "commit": "c", "bench_bin": fake, "quant_bin": fake,
            "build_info": {"variant": "native"},
            "files": {"Q2_K": {"error": "x"}, "Q4_0": {"path": tmp_path / "q.gguf"}}}
    out = peers.ensure_runnable(prep)
    if dies:
        assert built == ["no-amx"]
        assert out["bench_bin"] == tmp_path / "build-no-amx" / "bin" / "llama-bench"
        assert "SIGILL" in out["build_info"]["native_build_failed"] and out["build_info"]["variant"] == "no-amx"
    else:
        assert built == [] and out["bench_bin"] == fake and out["build_info"] == {"variant": "native"}


def e2e_fixture() -> list[dict]:
    rows = []
    for t in (1, 2):
        rows += [dict(engine="dbquant.runtime.decode", model="dbquant", lm_head="w8a8", threads=t, prompt_tokens=128,
                      new_tokens=64, prefill_tok_s=300.0 * t, decode_tok_s=70.0 * t),
                 dict(engine="dbquant.runtime.decode", model="fp32", lm_head="float32", threads=t, prompt_tokens=128,
                      new_tokens=64, prefill_tok_s=200.0 * t, decode_tok_s=30.0 * t),
                 dict(engine="llama.cpp", model="Q4_0", lm_head=None, threads=t, prompt_tokens=128, new_tokens=64,
                      prefill_tok_s=380.0 * t, decode_tok_s=55.0 * t)]
    return rows


def test_ratios_are_against_the_fastest_llamacpp_type_at_the_same_threads():
    rows = e2e_fixture() + [dict(engine="llama.cpp", model="Q2_K", lm_head=None, threads=1, prompt_tokens=128,
                                 new_tokens=64, prefill_tok_s=100.0, decode_tok_s=56.0)]
    peers.add_ratios(rows)
    w8a8_1, w8a8_2 = rows[0], rows[3]
    assert w8a8_1["decode_vs_llamacpp_best"] == round(70 / 56, 3)  # Q2_K is the faster decoder at 1 thread
    assert w8a8_1["prefill_vs_llamacpp_best"] == round(300 / 380, 3)  # Q4_0 the faster prefill
    assert w8a8_2["decode_vs_llamacpp_best"] == round(140 / 110, 3)
    assert all("decode_vs_llamacpp_best" not in r for r in rows if r["engine"] == "llama.cpp")


def _llama_bench_json(depths: tuple[int, ...]) -> str:
    """What llama-bench -o json prints for -p 128 -n 64 -d <depths>: pp and tg at each depth."""
    rows = []
    for d in depths:
        rows += [dict(n_prompt=128, n_gen=0, n_depth=d, avg_ts=300.0 - d, stddev_ts=1.0,
                      samples_ts=[299.0 - d, 301.0 - d], model_n_params=1, model_size=1),
                 dict(n_prompt=0, n_gen=64, n_depth=d, avg_ts=100.0 - d / 8, stddev_ts=2.0,
                      samples_ts=[99.0 - d / 8, 101.0 - d / 8], model_n_params=1, model_size=1)]
    return json.dumps(rows)


def test_llama_bench_times_decode_after_the_prompt_as_dbquant_does(monkeypatch):
    """e2e_rows' llama.cpp decode is tg after a context as long as the prompt (-d 0,P), the protocol of our
    rows (decode after the prompt); tg from an empty context is kept beside it; pp is from an empty context."""
    calls = []

    def fake_run(cmd, *a, **k):
        calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0, stdout=_llama_bench_json((0, 128)))

    monkeypatch.setattr(peers, "run", fake_run)
    prep = {"bench_bin": "llama-bench", "version": "v", "commit": "c", "files": {"Q4_0": {"path": "m.gguf",
                                                                                           "file_bytes": 8}}}
    rows = peers.e2e_rows(prep, ["Q4_0"], [1], [128], 64, 2)
    assert calls[0][calls[0].index("-d") + 1] == "0,128"
    (r,) = rows
    assert r["decode_tok_s"] == 84.0 and r["decode_tok_s_all"] == [83.0, 85.0]  # tg at depth 128
    assert r["decode_tok_s_empty"] == 100.0 and r["prefill_tok_s"] == 300.0  # depth 0
    assert "-d P" in r["protocol"]
    assert "-d" not in peers.llama_bench("b", "m", 1, 128, 64, 2, [])["command"]  # no depth: the default protocol
    monkeypatch.setattr(peers, "run", lambda cmd, *a, **k: subprocess.CompletedProcess(
        cmd, 0, stdout=_llama_bench_json((0,))))
    with pytest.raises(RuntimeError, match="tg64 at depth 128"):
        peers.llama_bench("b", "m", 1, 128, 64, 2, [], depth=128)


def test_ratios_against_both_decode_protocols():
    rows = e2e_fixture()
    for r in rows:
        if r["engine"] == "llama.cpp":
            r["decode_tok_s_empty"] = r["decode_tok_s"] * 1.25
    peers.add_ratios(rows)
    assert rows[0]["decode_vs_llamacpp_best"] == round(70 / 55, 3)
    assert rows[0]["decode_vs_llamacpp_empty"] == round(70 / (55 * 1.25), 3)
    assert "decode_vs_llamacpp_empty" not in peers.add_ratios(e2e_fixture())[0]  # rows without the figure


def test_plot_e2e_writes_a_png(tmp_path):
    png = tmp_path / "e.png"
    bench.plot_e2e(e2e_fixture(), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [bench.e2e_label(r) for r in e2e_fixture()[:3]] == ["dbquant w8a8 head", "fp32 float32 head",
                                                              "llama.cpp Q4_0"]
    with pytest.raises(RuntimeError, match="no end-to-end rows"):
        bench.plot_e2e([{"budget_bytes": 1}], str(png))


def test_peers_rows_join_the_json_and_the_plot_lands_next_to_it(tmp_path, capsys, monkeypatch):
    fx = e2e_fixture()
    monkeypatch.setattr(peers, "build_llamacpp", lambda: {"root": tmp_path})

    def ggufs(prep, types, hf_dir, jobs=2):
        prep["files"] = {t: {"path": tmp_path / f"{t}.gguf"} for t in types}
        return prep

    monkeypatch.setattr(peers, "make_ggufs", ggufs)
    monkeypatch.setattr("dbquant.cli.resolve_model", lambda name: tmp_path)
    monkeypatch.setattr(bench, "e2e_bench", lambda *a, threads, **k: [r for r in fx if r["engine"] != "llama.cpp"
                                                                      and r["threads"] == threads])
    monkeypatch.setattr(peers, "e2e_rows", lambda prep, types, threads, prompts, n, reps: [
        r for r in fx if r["engine"] == "llama.cpp" and r["threads"] in threads])
    js = tmp_path / "peers.json"
    code, _, err = run(capsys, "bench", "--e2e", tmp_path, "--peers", "--threads", "1,2", "--json", js)
    assert code == 0, err
    rows = json.loads(js.read_text())["rows"]
    assert sorted(r["engine"] for r in rows) == sorted(r["engine"] for r in fx)
    assert all(r["decode_vs_llamacpp_best"] > 0 for r in rows if r["engine"] != "llama.cpp")
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_pair_rows_of_the_same_round():
    """With ``round`` on the rows (bench --rounds), each dbquant row is compared with the llama.cpp rows of its
    own round only; merge_rounds then gives one row per configuration: the median figures and ratio, every
    sample, and each round's ratio."""
    fx = [r for r in e2e_fixture() if r["threads"] == 1]
    rows = [dict(r, round=0) for r in fx]
    rows += [dict(r, round=1, decode_tok_s=r["decode_tok_s"] * (2 if r["engine"] == "llama.cpp" else 1.5))
             for r in fx]
    rows += [dict(r, round=2, decode_tok_s=r["decode_tok_s"] * 3) for r in fx]
    peers.add_ratios(rows)
    w8a8 = [r for r in rows if r["lm_head"] == "w8a8"]
    assert [r["decode_vs_llamacpp_best"] for r in w8a8] == [round(70 / 55, 3), round(105 / 110, 3), round(70 / 55, 3)]
    merged = bench.merge_rounds(rows)
    assert len(merged) == len(fx) and all(m["rounds"] == 3 and "round" not in m for m in merged)
    m = next(m for m in merged if m["lm_head"] == "w8a8")
    assert m["decode_tok_s"] == 105.0  # median of 70, 105, 210
    assert m["decode_vs_llamacpp_best"] == round(70 / 55, 3)  # median of the rounds' own ratios
    assert m["decode_vs_llamacpp_best_rounds"] == [r["decode_vs_llamacpp_best"] for r in w8a8]
    assert m["decode_tok_s_all"] == [70.0, 105.0, 210.0]


def test_rounds_interleave_the_engines_and_keep_every_round(tmp_path, capsys, monkeypatch):
    fx = e2e_fixture()
    calls = []
    monkeypatch.setattr(peers, "build_llamacpp", lambda: {"root": tmp_path})

    def ggufs(prep, types, hf_dir, jobs=2):
        prep["files"] = {t: {"path": tmp_path / f"{t}.gguf"} for t in types}
        return prep

    def ours(*a, threads, **k):
        calls.append("dbquant")
        return [dict(r) for r in fx if r["engine"] != "llama.cpp" and r["threads"] == threads]

    def theirs(prep, types, threads, prompts, n, reps):
        calls.append("llama.cpp")
        return [dict(r) for r in fx if r["engine"] == "llama.cpp" and r["threads"] in threads]

    monkeypatch.setattr(peers, "make_ggufs", ggufs)
    monkeypatch.setattr("dbquant.cli.resolve_model", lambda name: tmp_path)
    monkeypatch.setattr(bench, "e2e_bench", ours)
    monkeypatch.setattr(peers, "e2e_rows", theirs)
    js = tmp_path / "rounds.json"
    code, _, err = run(capsys, "bench", "--e2e", tmp_path, "--peers", "--threads", "1,2", "--rounds", "2",
                       "--json", js, "--plot", tmp_path / "r.png")
    assert code == 0, err
    assert calls == ["dbquant", "dbquant", "llama.cpp"] * 2  # round after round, both engines in each
    data = json.loads(js.read_text())
    assert len(data["per_round"]) == 2 * len(fx) and {r["round"] for r in data["per_round"]} == {0, 1}
    assert len(data["rows"]) == len(fx) and all(r["rounds"] == 2 for r in data["rows"])
    assert all(len(r["decode_vs_llamacpp_best_rounds"]) == 2 for r in data["rows"] if r["engine"] != "llama.cpp")
    code, _, err = run(capsys, "bench", "--e2e", tmp_path, "--rounds", "0")
    assert code == 2 and "--rounds must be >= 1, got 0" in err


def test_a_stored_int8_head_gets_one_row_not_one_per_label(tmp_path, tiny_tokenizer):
    """A checkpoint whose tied head is a stored int8 table runs it for float32 / bfloat16 / int8 alike: e2e_bench
    gives it the rows int8 (stored) and w8a8 only; a dense head keeps every head type."""
    from dbquant.quantize import QuantizeOptions, quantize, save_output
    from tests.conftest import make_tiny_model

    assert cpu_backend.load_cpu()
    fp = make_tiny_model(vocab_size=len(tiny_tokenizer))
    fp.save_pretrained(tmp_path / "fp")
    tiny_tokenizer.save_pretrained(tmp_path / "fp")
    heads = {}
    for bits in ("8", "fp32"):
        model = make_tiny_model(vocab_size=len(tiny_tokenizer))
        model.load_state_dict(fp.state_dict())
        quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32, embed_bits=bits), progress=False)
        save_output(model, tmp_path / bits, tiny_tokenizer, False, {}, None)
        rows = bench.e2e_bench(str(tmp_path / bits), fp_model=str(tmp_path / "fp"), prompt_tokens=8, new_tokens=4,
                               threads=1, repeats=1)
        ours = [r for r in rows if r["engine"] == "dbquant.runtime.decode" and r["model"] == "dbquant"]
        heads[bits] = sorted({r["lm_head"] for r in ours})
        assert all(r["lm_head_stored_int8"] == (bits == "8" and r["lm_head"] == "int8")
                   or r["lm_head"] == "w8a8" for r in ours)
    assert heads == {"8": ["int8", "w8a8"], "fp32": ["bfloat16", "float32", "int8", "w8a8"]}
    # the quantized rows keep the float16 cache of the native step; one row beside them keeps a float32 one
    caches = [(r["lm_head"], r["prefill_gemm"], r["kv_cache"]) for r in ours]
    assert caches.count((ours[0]["lm_head"], ours[0]["prefill_gemm"], "float32")) == 1
    assert sum(c == "float16" for _, _, c in caches) == len(caches) - 1
    assert bench.e2e_label(dict(engine="dbquant.runtime.decode", model="dbquant", lm_head="w8a8", prefill_gemm="fp32",
                                kv_cache="float32")) == "dbquant w8a8 head, fp32 prefill, float32 cache"
    stored = dict(engine="dbquant.runtime.decode", model="dbquant", lm_head="int8", lm_head_stored_int8=True,
                  prefill_gemm="fp32")
    assert bench.e2e_label(stored) == "dbquant int8 (stored) head, fp32 prefill"
