"""What a run leaves behind and how it is shown: run directories, tables, figures, the HTML
report, ArviZ files."""
