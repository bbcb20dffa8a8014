"""`mambascope demo`: the whole slide pipeline on a small cohort cut from the bundled real slides."""
