"""The demo world: a local shop + docs website, a task suite with answer checkers, and a scripted teacher."""
