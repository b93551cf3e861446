"""Numbers shown: summary tables as text and HTML, matplotlib figures, the self-contained HTML
page, ArviZ files.  Everything here takes numbers computed elsewhere (dicts, arrays) and computes
none; it sits low in the layers so that the result types above can show themselves (a
``Diagnostics`` is a table in a terminal and in Jupyter)."""
