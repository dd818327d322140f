Feature: The event log is the truth
  run_events is append-only at the database level, and replaying it rebuilds the projections exactly.

  Background:
    Given a running API on a fresh database

  Scenario: The event log refuses UPDATE and DELETE
    Given I started a run of "runtime.noop"
    When I try to UPDATE, DELETE and TRUNCATE run_events directly
    Then each statement is refused by the database
    And the run's events are, in order: run.queued

  @one_auth_pass
  Scenario: Replayed projections equal the live ones after a mixed workload
    Given a mixed workload of succeeded, failed, retried, canceled and queued runs
    When I rebuild the projections with the replay command
    Then workflows, runs, run_steps, tool_calls, run_artifacts and step_cache equal what they were before the replay

  @one_auth_pass
  Scenario: Replayed projections equal the live ones after DAG runs
    Given DAG runs that succeeded with a retried step, were resumed after a SIGKILL, failed, were canceled and made artifacts
    When I rebuild the projections with the replay command
    Then workflows, runs, run_steps, tool_calls, run_artifacts and step_cache equal what they were before the replay
