"""Report writers: NetDissect's tally.csv and thresholds.csv, the HTML report, the plots, and `dissect report`."""
