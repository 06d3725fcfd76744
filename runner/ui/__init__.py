"""The commands and what people read: the command line (cli.py), inspect (inspect.py),
the HTML report (report.py), a sweep's page (sweeppage.py) and CKA comparison (compare.py),
retry (retry.py), the demo's sample photos (samples.py: python -m runner.ui.samples). The
Python API stays runner.api (users import it by that name).

May import: everything (runner.launch and below).
"""
