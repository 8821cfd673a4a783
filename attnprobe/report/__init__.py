"""The report wing: what a person reads, from finished run folders or one sentence.

Owns ``attnprobe report`` (writer.py) with its data types (datatypes.py), figures (figures.py, curves.py,
thumbnails.py, pattern_figures.py) and HTML page (page.py); ``attnprobe show`` (show.py); and the closing
summaries printed by scan and refine (summaries.py). The only wing that imports matplotlib. Imports every
wing below it; never the CLI.
"""
