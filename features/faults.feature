Feature: Nothing lost, nothing run twice
  Leases, heartbeats, the reaper, retries and cancellation keep every accepted run moving to a
  terminal state, with at most one worker executing an attempt, through crashes and restarts.

  Background:
    Given a running API with short leases on a fresh database

  Scenario: A SIGKILLed worker's run is finished by another worker
    Given a worker process holding a run of tool "sleep" with args {"seconds": 2}
    When that worker is killed with SIGKILL
    And another worker process is started
    Then the run ends SUCCEEDED
    And the run has exactly one successful attempt, after a lease_expired attempt
    And the stats count at least 1 lease_expired and 1 requeued

  @one_auth_pass
  Scenario: A paused worker resumed after its run was re-claimed records nothing
    Given a worker process holding a run of tool "sleep" with args {"seconds": 3}
    When that worker is paused with SIGSTOP until the run is claimed by another worker
    And the paused worker is resumed with SIGCONT
    Then the run ends SUCCEEDED
    And the resumed worker recorded nothing for the run after its lease expired
    And the resumed worker says it stopped working on the run

  @one_auth_pass
  Scenario: A paused worker whose run was not claimed again re-adopts it
    Given a worker process holding a run of tool "sleep" with args {"seconds": 6}
    When that worker is paused with SIGSTOP until its lease has expired
    And the paused worker is resumed with SIGCONT
    Then the run ends SUCCEEDED
    And the worker re-adopted the run under attempt 2 and finished it
    And the stats count at least 1 readopted

  Scenario: Canceling a running run stops its tool
    Given a worker process holding a run of tool "sleep" with args {"seconds": 60}
    When I cancel the run
    Then the run ends CANCELED within 5 seconds
    And the run's events end with: tool.failed, step.canceled, run.canceled

  Scenario: Canceling a run whose worker is gone ends it CANCELED when the lease expires
    Given a worker process holding a run of tool "sleep" with args {"seconds": 60}
    When that worker is killed with SIGKILL
    And I cancel the run
    Then the run ends CANCELED
    And the run's events end with: run.cancel_requested, run.lease_expired, run.canceled

  Scenario: A failing tool is retried with backoff until it succeeds
    Given a worker process is started
    When I start a run of tool "fail" with args {"message": "flaky", "times": 2} and 3 attempts
    Then the run ends SUCCEEDED
    And GetRun shows attempts: retried "flaky", retried "flaky", completed

  Scenario: A non-retryable failure ends the run at once
    Given a worker process is started
    When I start a run of tool "fail" with args {"message": "bad input", "retryable": false} and 3 attempts
    Then the run ends FAILED
    And GetRun shows attempts: failed "bad input"

  Scenario: A shell command's exit code and output are recorded
    Given a worker process is started
    When I start a run of tool "shell" with args {"command": ["sh", "-c", "echo out; echo err >&2; exit 3"], "retryable": false}
    Then the run ends FAILED
    And the tool call output has exit code 3, stdout "out" and stderr "err"

  Scenario: A worker that does not allow shell is never handed a shell run
    Given a worker process with the default tools is started
    When I start a run of tool "shell" with args {"command": ["true"]} and 1 attempts
    Then the worker takes a noop run queued after it, and the shell run stays QUEUED with no attempt
    And ExplainRun says no worker declared the tools it needs (shell)

  Scenario: A worker stopped with SIGTERM gives back what it cannot finish
    Given a worker process holding a run of tool "sleep" with args {"seconds": 5}
    When that worker is stopped with SIGTERM
    Then the worker exits cleanly
    And the run is queued again at once, with a released attempt
    When another worker process is started
    Then the run ends SUCCEEDED

  Scenario: Restarting the API while workers hold runs loses nothing
    Given 2 worker processes are started
    And 6 runs of tool "sleep" with args {"seconds": 2} are running
    When the API is restarted
    Then every run ends SUCCEEDED
    And every run has exactly one successful attempt

  @one_auth_pass
  Scenario: Killing workers repeatedly during 300 mixed runs loses nothing
    Given 300 runs of mixed tools
    When 3 workers run them while one is SIGKILLed and replaced every 1.5 seconds, 5 times
    Then every run ends in a terminal state
    And no run has two overlapping attempts
    And every run's event sequence is gapless
