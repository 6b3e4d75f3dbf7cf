"""epg benchmark suites (see README.md): a package so the suites share common.py and flops.py."""
