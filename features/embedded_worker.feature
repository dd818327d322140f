Feature: Embedded worker
  With RUN_WORKER_EMBEDDED=true the API process executes runs itself, with no worker process.

  Scenario: A queued run succeeds without any separate worker
    Given a running API with the embedded worker on
    When I start a run of "runtime.noop"
    Then the run ends SUCCEEDED
    And the run's events are, in order: run.queued, run.claimed, run.started, step.created, step.started, tool.invoked, tool.succeeded, step.succeeded, run.completed
