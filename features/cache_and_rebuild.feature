Feature: Step cache and partial rebuilds
  A step whose input has not changed is not executed again: its earlier output and artifacts are
  reused from the cache (Redis in front of PostgreSQL). A rebuild of a finished run re-executes only
  the steps a change touches and their downstream steps, and takes the rest from the base run.

  Background:
    Given a running API with the step cache and a worker running every tool

  @one_auth_pass
  Scenario: The campaign run twice with the same input executes no tool the second time
    When I run the campaign with {"product": "Acme Rockets", "audience": "coyotes"}
    And I run the campaign with {"product": "Acme Rockets", "audience": "coyotes"}
    Then the second run invoked no tool
    And every step of the second run is SKIPPED with reason cache_hit from the first run
    And the second run's artifacts have the first run's sha256

  @one_auth_pass
  Scenario: Only the steps whose resolved input changed execute
    Given the workflow "split" is registered: a echoes input.x, b echoes input.y, c echoes a's output, all cached
    When I start a run of "split" with {"x": 1, "y": 1} and it succeeds
    And I start a run of "split" with {"x": 1, "y": 2} and it succeeds
    Then in the last run only step b executed, with cache miss reason no_entry
    And steps a and c of the last run are cache hits

  Scenario: A run_only step never hits across runs
    Given the workflow "private" is registered: one echo step with cache scope run_only
    When I start a run of "private" with {"x": 1} and it succeeds
    And I start a run of "private" with {"x": 1} and it succeeds
    Then in the last run only step only executed, with cache miss reason scope_run_only

  @one_auth_pass
  Scenario: An artifact deleted from the store turns a hit into a miss
    When I run the campaign with {"product": "Gone", "audience": "testers"}
    And the artifact brief.txt of that run is deleted from the artifact store
    And I run the campaign with {"product": "Gone", "audience": "testers"}
    Then step brief of the last run executed with cache miss reason artifact_missing naming brief.txt
    And steps copy and images of the last run are cache hits

  @one_auth_pass
  Scenario: With Redis stopped, runs still succeed from the PostgreSQL layer
    When I run the campaign with {"product": "Sturdy", "audience": "operators"}
    And the test's Redis server is stopped
    And I run the campaign with {"product": "Sturdy", "audience": "operators"}
    Then every step of the last run is a cache hit from the cold layer
    And the API logged one warning about Redis being unavailable

  @one_auth_pass
  Scenario: A cold hit is promoted and the next one is hot
    When I run the campaign with {"product": "Warm", "audience": "caches"}
    And the test's Redis server is flushed
    And I run the campaign with {"product": "Warm", "audience": "caches"}
    And I run the campaign with {"product": "Warm", "audience": "caches"}
    Then every step of the second run is a cache hit from the cold layer
    And every step of the last run is a cache hit from the hot layer
    And GetStats counts hits by layer and misses by reason

  @one_auth_pass
  Scenario: Invalidation removes entries from both layers
    When I run the campaign with {"product": "Fresh", "audience": "editors"}
    And I invalidate the cache of workflow campaign.build
    Then the invalidation removed at least 5 entries
    When I run the campaign with {"product": "Fresh", "audience": "editors"}
    Then every step of the last run executed with cache miss reason no_entry

  Scenario: A copy_update rebuild re-executes copy, landing_page and bundle and reuses the rest
    When I run the campaign with {"product": "Rebuilt", "audience": "reviewers"}
    And I rebuild that run with change request copy_update
    Then the rebuild succeeds
    And in the rebuild exactly copy, landing_page and bundle executed
    And brief and images are SKIPPED reused_from_base with byte-identical artifacts

  Scenario: A dry run creates nothing
    When I run the campaign with {"product": "Planned", "audience": "planners"}
    And I ask for a dry run of a copy_update rebuild of that run
    Then the plan reruns copy, landing_page, bundle and reuses brief, images
    And no run was created by the dry run

  Scenario: Rebuilds of a failed run and of an unknown change request are refused
    Given a run of tool "fail" with args {"message": "no", "retryable": false} that failed
    When I rebuild that failed run with change request copy_update
    Then the rebuild is refused with FAILED_PRECONDITION naming status FAILED
    When I run the campaign with {"product": "Typo", "audience": "spellers"}
    And I rebuild that run with change request nope_update
    Then the rebuild is refused with INVALID_ARGUMENT listing brief_update, copy_update, image_update

  @one_auth_pass
  Scenario: Explain says why a step ran and what changed since the nearest entry
    When I run the campaign with {"product": "One", "audience": "readers"}
    And I run the campaign with {"product": "Two", "audience": "readers"}
    Then explain says step brief of the last run executed after a no_entry miss because input.product changed from "One" to "Two"
    When I run the campaign with {"product": "Two", "audience": "readers"}
    Then explain says step brief of the last run is a cache_hit from the second run
