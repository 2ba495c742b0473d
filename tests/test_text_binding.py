"""benchmarks.text_binding: the text tower trained alone, per initialisation, and the figures it prints."""

from benchmarks import text_binding


def test_prints_a_row_per_init_and_report_point_and_clip_starts_order_sensitive(capsys):
    text_binding.main(["--steps", "4", "--batch", "8", "--held-out", "40", "--reports", "2", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:4] == ["init", "step", "s", "layout"] and header[5:] == [
        "swap_color", "swap_position", "swap_shape", "swap_size"]  # fmt: skip
    rows = {(r[0], int(r[1])): [float(v) for v in r[3:]] for r in (line.split() for line in lines[2:])}
    assert set(rows) == {(init, step) for init in ("trunc_normal", "clip") for step in (0, 2, 4)}
    assert all(-1 <= v <= 1 for row in rows.values() for v in row)
    # Untrained, trunc_normal's near-uniform attention embeds a caption and its swap almost alike; CLIP's
    # init attends by content from the start, so word order already moves the embedding.
    plain, clip = rows["trunc_normal", 0][1:], rows["clip", 0][1:]
    assert all(c < p - 0.03 for c, p in zip(clip, plain)), (clip, plain)
