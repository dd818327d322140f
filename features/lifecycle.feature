Feature: Run lifecycle
  A run is queued by StartRun, claimed exactly once by a worker, executed with its tool, and
  projected from its events.

  Background:
    Given a running API on a fresh database

  Scenario: A queued run is consumed exactly once
    When I start a run of "runtime.noop"
    And a worker runs one cycle
    Then the cycle claimed 1 and succeeded 1
    And the run ends SUCCEEDED
    And the run has one step "runtime" and one tool call "noop", both succeeded
    And the run's events are, in order: run.queued, run.claimed, run.started, step.created, step.started, tool.invoked, tool.succeeded, step.succeeded, run.completed

  Scenario: A second worker cycle is a no-op for an ended run
    Given I started a run of "runtime.noop"
    And a worker ran one cycle
    When a worker runs one cycle
    Then the cycle claimed 0 and succeeded 0
    And the run ends SUCCEEDED
    And the run has exactly one run.claimed event

  Scenario: An error after start fails the run with the error
    When I start a run of tool "fail" with args {"message": "boom", "retryable": false}
    And a worker runs one cycle
    Then the run ends FAILED
    And the run's error is "boom"
    And the run's events end with: tool.failed, step.failed, run.failed

  @one_auth_pass
  Scenario: Four concurrent workers execute 500 queued runs exactly once
    Given 500 queued runs
    When 4 worker processes run until every run has ended
    Then every run SUCCEEDED
    And every run has exactly one run.claimed event and one run.completed event
    And the claims are spread over more than one worker

  Scenario: WatchRun delivers the full ordered chain and ends
    Given I started a run of "runtime.noop"
    When I watch the run while a worker executes it
    Then the watch received every event of the run, in order with no gaps, ending with run.completed
    And the watch stream ended by itself

  Scenario: Listing runs pages through them newest first
    Given 7 queued runs
    When I list runs 3 per page
    Then I get 3 pages with 7 distinct runs, newest first
    And listing with status SUCCEEDED returns no runs

  @one_auth_pass
  Scenario: Many concurrent watchers all receive the whole chain
    Given I started a run of "runtime.noop"
    When 40 clients watch the run while a worker executes it
    Then every watcher received every event of the run in order and its stream ended
