"""Jobs: work that HTTP threads validate and enqueue, and one owner of the device runs.

One module per concern; this package imports none of them, so each can be imported alone:

* ``spec``     -- what a job asks for (``JobSpec``), checked completely before it is queued;
* ``record``   -- a job's state (``Job``, its items and statuses) and its JSON record;
* ``store``    -- ``JobStore``: live jobs in memory, every job as a record on disk;
* ``backend``  -- ``JobBackend``: what the web layer needs from whatever runs jobs;
* ``executor`` -- ``Executor``: the embedded backend, one thread that owns the device;
* ``visualize`` -- ``VisualizeRun``: runs one visualization job through ``app.pipeline``.

A second backend (a distributed queue) implements ``JobBackend`` and calls the same runs; the
pipeline and the views do not change.
"""
