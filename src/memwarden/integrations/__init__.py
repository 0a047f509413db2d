"""One thin file per job framework: its hooks in, the warden's drain/recycle/kill out."""
