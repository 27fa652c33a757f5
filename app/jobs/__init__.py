"""Jobs: work that HTTP threads validate and enqueue, and one owner of the device runs.

One module per concern; this package imports none of them, so each can be imported alone:

* ``spec``      -- what a visualization job asks for (``JobSpec``), checked completely before it
  is queued;
* ``record``    -- a job's state (``Job``, its items and statuses) and its JSON record;
* ``store``     -- ``JobStore``: live jobs in memory, every job as a record on disk;
* ``kinds``     -- every kind of job: its spec type and its run, by name;
* ``visualize`` -- ``VisualizeRun``: a visualization job, step by step, through ``app.pipeline``;
* ``running``   -- starting and ending a job, the same for every kind and backend;
* ``resources`` -- what a run uses of the process's ``Services``;
* ``backend``   -- ``JobBackend``: what the web layer needs from whatever runs jobs;
* ``executor``  -- ``Executor``: the embedded backend, one thread that owns the device and
  interleaves running jobs fairly.

A second backend (a distributed queue) implements ``JobBackend`` and calls ``running.run_job``;
the pipeline, the kinds and the views do not change.
"""
