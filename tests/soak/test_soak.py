"""The soak in two minutes (`make soak` runs the same code for ten): 100 users against three fake vLLM
backends through `sluice serve`, with Redis and PostgreSQL of its own, under compressed chaos — a backend
SIGKILLed and restarted every 30 s, Redis and PostgreSQL each restarted once — held to the soak's bars.

RSS and descriptors are compared over 30-second windows (second vs last) instead of minutes, so every bar
is measured. The load is light for the machine (about 50 requests/s; on 2 cores the gateway uses about a
tenth of one, the load generator less), so the bars do not depend on how busy CI is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.progress import Progress
from bench.soak import SoakOptions, soak
from bench.soak_report import markdown

OPTIONS = SoakOptions(duration_s=120.0, kill_every_s=30.0, window_s=30.0, users=100, workers=2)


async def test_soak_for_two_minutes_under_chaos_meets_every_bar(tmp_path: Path) -> None:
    options = dataclasses.replace(OPTIONS, logs=tmp_path)  # the processes' logs stay there for a post-mortem
    report = await soak(options, Progress(total_steps=4, planned_s=OPTIONS.duration_s + 30))
    table = markdown(report)
    print(table)
    assert report.held, (
        "bars missed:\n"
        + "\n".join(f"- {bar.name}: {bar.measured} (limit {bar.limit})" for bar in report.missed())
        + "\n\n"
        + table
    )
    assert len(report.events) == 10  # 3 kills and 3 restarts, Redis and PostgreSQL stopped and started
    assert report.excluded_cuts < report.requests * 0.01  # only streams in flight at a kill are excluded
