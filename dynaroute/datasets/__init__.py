"""Reading labelled classification data: files (CSV, TSV, JSON Lines, .npz) or arrays, their
labels, their splits and the tabular features' standardisation. One module per concept."""
