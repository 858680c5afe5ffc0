"""Graders: math answers (:mod:`.math`) and code executed in a sandbox (:mod:`.code`)."""
