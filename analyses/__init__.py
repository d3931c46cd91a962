"""Analysis plugins: one file per analysis (pure functions + a thin ``cnnft.analysis.Analysis``
callback) and one ``conf/analyses/<name>.yaml``."""
