Feature: Workflows as DAGs
  A workflow is a registered graph of steps; the worker that claims a run executes its ready steps
  in parallel, passes values along by selectors, retries failing steps by their own policy, resumes
  after a crash without running a finished step again, and records every step's output and files.

  Background:
    Given a running API with short leases and every tool on a fresh database

  Scenario: A diamond runs its middle steps side by side and joins after both
    Given the workflow "diamond" is registered: a -> (b || c) -> d, where b and c sleep 1.5 seconds
    And a worker process is running
    When I start a run of workflow "diamond"
    Then the run ends SUCCEEDED
    And steps b and c overlapped in time
    And step d started only after b and c had both succeeded
    And the run's output holds the output of its sink step d

  Scenario: Selectors pass the run input and an upstream output into a step
    Given the workflow "selectors" is registered: a echoes {"greeting": "hi"}, b echoes x from input.x and from_a from steps.a.output
    And a worker process is running
    When I start a run of workflow "selectors" with input {"x": 42}
    Then the run ends SUCCEEDED
    And step b's tool was invoked with {"x": 42, "from_a": {"greeting": "hi"}}

  Scenario Outline: A bad spec is refused with its field named and nothing stored
    When I register a spec with <problem>
    Then the registration is refused with INVALID_ARGUMENT naming the field "<field>"
    And the message says "<words>"
    And no workflow was stored

    Examples:
      | problem                      | field                       | words                  |
      | a cycle                      | spec.steps[0].depends_on[0] | cycle: a -> b -> c -> a |
      | an unknown dependency        | spec.steps[1].depends_on[0] | names no step: 'nope'  |
      | a selector that does not parse | spec.steps[1].input.v     | does not parse         |
      | a selector of a step not upstream | spec.steps[1].input.v  | not upstream of 'b'    |

  Scenario: A step that fails twice succeeds on its third try
    Given the workflow "flaky" is registered: one step that fails twice, with 3 tries
    And a worker process is running
    When I start a run of workflow "flaky"
    Then the run ends SUCCEEDED
    And step flaky shows 3 tries and 3 tool calls, all in run attempt 1

  Scenario: A step that exhausts its tries fails the run and the other steps' outputs stay
    Given the workflow "doomed" is registered: a echoes, then b always fails with 2 tries while c sleeps
    And a worker process is running
    When I start a run of workflow "doomed"
    Then the run ends FAILED
    And the run stopped with reason step_failed and an error naming step b
    And step a SUCCEEDED with its output kept, b FAILED after 2 tries, c CANCELED

  @one_auth_pass
  Scenario: A worker killed during step 2 of 3: another finishes and step 1 ran exactly once
    Given the workflow "chain" is registered: s1 echoes, s2 sleeps 3 seconds, s3 echoes
    And a worker process "first" is running
    When I start a run of workflow "chain"
    And step s2 is running
    And the worker "first" is killed with SIGKILL
    And another worker process is started
    Then the run ends SUCCEEDED
    And step s1's tool was invoked exactly once over the whole run
    And step s2's tool was invoked twice, once per attempt

  @one_auth_pass
  Scenario: Cancel in the middle of a DAG
    Given the workflow "long" is registered: a echoes, then b and c sleep 60 seconds, then d
    And a worker process is running
    When I start a run of workflow "long"
    And steps b and c are running
    And I cancel the run
    Then the run ends CANCELED within 5 seconds
    And steps b, c and d are CANCELED and d never started

  @one_auth_pass
  Scenario: The campaign sample builds its five files
    Given a worker process is running
    When I start a run of workflow "campaign.build" with input {"product": "Acme Rockets", "audience": "coyotes"}
    Then the run ends SUCCEEDED
    And the run has 5 artifacts: brief.txt, copy.txt, hero.svg, index.html, campaign.zip
    And every artifact downloads with the sha256 and size it was recorded with
