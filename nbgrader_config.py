"""nbgrader's settings for llmbook's course folder, read by `llmbook exercises` and by `nbgrader ...`
run at the repository root (after `llmbook exercises release` has filled build/exercises/source)."""

c = get_config()  # noqa: F821 (nbgrader defines it when it reads this file)

# The course folder: source/, release/ (student versions), submitted/, autograded/, gradebook.db.
# `llmbook exercises ... --out DIR` puts it elsewhere.
c.CourseDirectory.root = "build/exercises"
# Seconds one cell may run while autograding; the slowest full-mode cells take a few minutes on a
# 2-core CPU (the same limit as the notebook tests' --nbval-cell-timeout).
c.Execute.timeout = 900
