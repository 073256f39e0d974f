"""Front-end files of nnpatch widgets (JavaScript and CSS), shipped in the wheel as `nnpatch.widgets`."""
