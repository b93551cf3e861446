"""Every string of a report that comes from a run is shown as text, never run as markup."""

from __future__ import annotations

from elbogap.presentation.html import FigureItem, Note, Table, render_html

HOSTILE = '<script>alert("x")</script>'


def test_every_slot_of_the_report_escapes_what_a_run_brings():
    page = render_html(
        f"report {HOSTILE}", f"run runs/{HOSTILE} · model {HOSTILE}",
        [Note(f"site '{HOSTILE}' is Monte Carlo"), Note(HOSTILE, warning=True)],
        [Table(f"plate {HOSTILE}", (HOSTILE, "mean"), [(f"  site '{HOSTILE}'", "1.0")])],
        [FigureItem(f"figure {HOSTILE}", f"caption {HOSTILE}", b"\x89PNG")])
    assert "<script>" not in page
    # Title (twice: <title> and <h1>), subtitle (twice), two notes, table title, header and cell,
    # figure title (twice: heading and alt text) and caption.
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 12
