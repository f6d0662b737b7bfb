"""
The fan-out benchmark's table: its rows from the runs' result dicts, as a
plain fixed-width table (an RST simple table, readable as it is), the
legend under it and the per-player memory slope of each target.
"""

COLUMNS = (
    ("target", "<"),
    ("players", ">"),
    ("CPU-s/player-min", ">"),
    ("peak RSS MB", ">"),
    ("latency p50/p99 s", ">"),
    ("first byte p50 ms", ">"),
    ("gap-free", ">"),
    ("engine sessions", ">"),
)

LEGEND = """\
CPU-s/player-min: CPU seconds of the target's processes (summed over them) per player-minute measured.
peak RSS MB: peak resident set (VmHWM) of the target's process; for several processes (aceproxy-redis's
  workers, a peer's process tree) the largest one, with their sum in parentheses.
latency: from the engine sending a packet to its arrival at the player, over packets (a random sample).
first byte: request to first body byte, p50 over the players joining the running stream; at 1 player,
  that of the player who starts the stream (*).
gap-free: players that got every data packet in order, none missing or repeated, to the end.
engine sessions: getstream calls the engine answered during the run."""


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(result: dict) -> list[str]:
    """One table row from one run's result."""
    name, players = result["target"], str(result["players"])
    if result.get("error"):
        return [name, players, "failed: " + result["error"][:60], "", "", "", "", ""]
    rss = _number(result["peak_rss_mb"], 1)
    if result.get("processes", 1) > 1:
        rss += f" ({result['peak_rss_sum_mb']:.1f})"
    latency = f"{_number(result['latency_p50'], 3)} / {_number(result['latency_p99'], 3)}"
    first_byte = _number(result["first_byte_p50_ms"], 1)
    if result["players"] == 1 and result["first_byte_p50_ms"] is not None:
        first_byte += "*"
    return [
        name,
        players,
        _number(result["cpu_per_player_minute"], 4),
        rss,
        latency,
        first_byte,
        f"{result['gap_free']}/{result['players']}",
        str(result["engine_sessions"]),
    ]


def format_table(results: list[dict]) -> str:
    """
    The runs as one table, a row per run in the order given; a run that
    failed shows its error across the figures.
    """
    header = [title for title, _ in COLUMNS]
    rows = [row(r) for r in results]
    widths = [len(title) for title in header]
    for cells in rows:
        for i, cell in enumerate(cells):
            if not cell.startswith("failed: "):
                widths[i] = max(widths[i], len(cell))
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        if len(cells) > 2 and cells[2].startswith("failed: "):
            return "  ".join([cells[0].ljust(widths[0]), cells[1].rjust(widths[1]), cells[2]]).rstrip()
        return "  ".join(
            cell.ljust(w) if align == "<" else cell.rjust(w)
            for cell, w, (_, align) in zip(cells, widths, COLUMNS)
        ).rstrip()

    return "\n".join([rule, line(header), rule, *(line(cells) for cells in rows), rule])


def slopes(results: list[dict]) -> list[str]:
    """
    Per-player memory of each target: the peak RSS (summed over its
    processes) between the smallest and the largest number of players, and
    between the second largest and the largest (1 -> 1000 and 300 -> 1000
    with the default sizes), in KB per player.
    """
    by_target = {}
    for result in results:
        if not result.get("error"):
            by_target.setdefault(result["target"], {})[result["players"]] = result["peak_rss_sum_mb"]
    sizes = sorted({r["players"] for r in results})
    if len(sizes) < 2:
        return []
    pairs = [(sizes[0], sizes[-1])]
    if len(sizes) > 2:
        pairs.append((sizes[-2], sizes[-1]))
    lines = []
    for target, rss in by_target.items():
        parts = []
        for low, high in pairs:
            if low in rss and high in rss:
                kb = (rss[high] - rss[low]) * 1024 / (high - low)
                parts.append(f"{kb:.1f} KB/player ({low} -> {high})")
        if parts:
            lines.append(f"  {target}: " + ", ".join(parts))
    if lines:
        lines.insert(0, "Memory per player, (peak RSS at high - at low) / (high - low), RSS summed over processes:")
    return lines
