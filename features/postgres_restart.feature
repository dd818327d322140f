Feature: PostgreSQL restarts
  While the database is down the API says NOT_SERVING and refuses calls with UNAVAILABLE; it
  recovers by itself, and every run in flight still ends.

  @one_auth_pass
  Scenario: Restarting PostgreSQL while runs are in flight loses nothing
    Given an API and 2 workers on a PostgreSQL server the test controls
    And 8 runs of tool "sleep" with args {"seconds": 1} are in flight
    When PostgreSQL is stopped
    Then the API reports NOT_SERVING
    And StartRun fails with UNAVAILABLE
    When PostgreSQL is started again
    Then the API reports SERVING
    And every run in flight ends SUCCEEDED, each with exactly one run.completed event
