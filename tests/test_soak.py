"""The soak's CI form: three quarters of a minute of chaos, then nothing may be left over."""

from trio_kv.tools.soak import DISTINCT_CHUNKS, run_soak


async def test_soak_leaks_nothing_and_loses_no_byte():
    lines: list[str] = []
    report = await run_soak(45.0, clients=8, seed=7, progress=lines.append)
    # A line every 10 s of load (at about 10, 20, 30 and 40 s), then one as the audit starts.
    *load, audit = lines
    assert len(load) == 4 and all(line.startswith("bench soak: ") and "/45 s, " in line for line in load)
    assert audit.startswith("bench soak: load over")
    # The run really exercised the paths it audits.
    assert report.requests > 1000
    assert report.faults_injected > 10
    assert report.clients_killed > 50
    assert report.chunks_verified > 1000
    assert report.l2_loads > 0 and report.l1_evictions > 0
    assert report.truncations > 10
    assert report.bombs_sent > 50
    # And left nothing behind.
    assert report.leaked_leases == 0
    assert report.leaked_bytes == 0
    assert report.ledger_problems == []
    assert report.l2_ledger_mismatches == 0
    assert report.leaked_tasks == 0
    assert report.data_mismatches == 0
    assert report.truncation_surprises == 0  # each copy from or into a truncated file failed
    assert report.bomb_wrong_replies == 0
    # What it stores is bounded, so resident memory measures leaks, not the run's length.
    assert 0 < report.l2_objects_held <= DISTINCT_CHUNKS
    assert report.rss_growth_after_warmup_mib < 16
