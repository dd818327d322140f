Feature: Run API requests
  StartRun validates and deduplicates; CancelRun follows the run's state; bad input is refused
  with a status naming the field, and nothing is stored.

  Background:
    Given a running API on a fresh database

  Scenario: The same idempotency key returns the same run
    When I start a run with idempotency key "order-42" twice
    Then both answers name the same run
    And the second answer says it was deduplicated
    And the database holds 1 run

  Scenario: Concurrent identical requests create one run
    When 16 clients start a run with idempotency key "burst-1" at the same time
    Then all of them get the same run
    And the database holds 1 run

  Scenario: The same key with a different request is refused
    Given I started a run with idempotency key "order-7"
    When I start a run with idempotency key "order-7" and a different input
    Then the call fails with ALREADY_EXISTS
    And the database holds 1 run

  Scenario Outline: Invalid StartRun requests are refused and store nothing
    When I send a StartRun with <bad input>
    Then the call fails with <code> naming the field "<field>"
    And the database holds 0 runs

    Examples:
      | bad input                     | code               | field           |
      | an unknown workflow           | INVALID_ARGUMENT   | workflow        |
      | a 256-character key           | INVALID_ARGUMENT   | idempotency_key |
      | an input over 256 KiB         | RESOURCE_EXHAUSTED | input           |
      | an unknown tool               | INVALID_ARGUMENT   | input.tool      |
      | a negative sleep              | INVALID_ARGUMENT   | input.args.seconds |
      | an input with a NUL character | INVALID_ARGUMENT   | input           |
      | an input with NaN             | INVALID_ARGUMENT   | input           |

  Scenario: A run canceled before it is claimed never starts
    Given I started a run of "runtime.noop"
    When I cancel the run
    Then the run ends CANCELED
    And a worker cycle claims nothing
    And the run has no run.started event
    And canceling it again answers the same CANCELED run

  Scenario: A finished run cannot be canceled
    Given I started a run of "runtime.noop"
    And a worker ran one cycle
    When I cancel the run
    Then the call fails with FAILED_PRECONDITION

  Scenario: Unknown runs are NOT_FOUND
    When I get the run "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    Then the call fails with NOT_FOUND
