"""bench --e2e --kv: the memory-budget figures from measured rows (pure arithmetic on the rows)."""

from dbquant.bench.kv import BUDGET, budget_rows


def _row(kv, prompt, packed=0, tokens_packed=0, residual=0, sink=0):
    return dict(kv=kv, prompt_tokens=prompt, fp16_bytes_per_token=23040,
                packed_bytes_per_token=packed / tokens_packed if tokens_packed else None,
                cache_bytes=dict(packed=packed, residual=residual, sink=sink, tokens_packed=tokens_packed))


def test_budget_rows_use_the_longest_prompt_and_the_fixed_fp_part():
    rows = [_row("fp", 512), _row("1.5/1.58", 512, packed=1, tokens_packed=1),
            _row("fp", 4096), _row("1.5/1.58", 4096, packed=2768 * 3968, tokens_packed=3968, residual=1000, sink=10)]
    out = budget_rows(rows, weight_bytes=100_000_000)
    assert [r["kv"] for r in out] == ["fp16", "1.5/1.58"]  # only the 4096-token row, fp16 beside it
    assert out[0]["max_tokens"] == (BUDGET - 100_000_000) // 23040
    assert out[1]["max_tokens"] == (BUDGET - 100_000_000 - 1010) // 2768
    assert out[1]["fixed_fp_bytes"] == 1010
