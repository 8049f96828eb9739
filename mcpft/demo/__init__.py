"""The demo world: a local shop + docs website, a task suite with answer checkers, and a scripted teacher.

    from mcpft.demo import serve_site, load_tasks, next_step
"""

from mcpft.demo.site import Site, serve_site
from mcpft.demo.tasks import CheckResult, Task, load_tasks, task_by_id
from mcpft.demo.teacher import Episode, TeacherError, next_step, run_episode

__all__ = ["CheckResult", "Episode", "Site", "Task", "TeacherError", "load_tasks", "next_step", "run_episode",
           "serve_site", "task_by_id"]
