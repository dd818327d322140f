// The dashboard's little script: live fragments, the run's event stream, cancel and rebuild.
// Changes are POSTed with the X-Runs-Csrf header the API requires of them. The event types to
// listen for, and which of them end a run, are the server's (shared.events), in the run page's
// data-event-types and data-terminal-types; what the page offers (cancel, rebuild) is the server's
// too (the fragment's markup), and a refusal is shown with the handler's own message.
(function () {
  "use strict";

  function words(node, name) {
    return (node.getAttribute(name) || "").split(" ").filter(function (w) { return w !== ""; });
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Runs-Csrf": "1" },
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) {
        if (!r.ok) { throw new Error((data && data.message) || ("HTTP " + r.status)); }
        return data;
      });
    });
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  // --- a fragment that is fetched again (every 2 s, or when told) ---------------------------
  function LiveFragment(box, onSwap) {
    var busy = false, again = false;
    this.refresh = function () {
      if (busy) { again = true; return; }
      busy = true;
      fetch(box.getAttribute("data-live"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var open = Array.prototype.map.call(box.querySelectorAll("details[open]"), function (d) { return d.id; });
          box.innerHTML = html;
          open.forEach(function (id) { var d = id && document.getElementById(id); if (d) { d.open = true; } });
          if (onSwap) { onSwap(); }
        })
        .catch(function () { /* keep what is shown; the next tick tries again */ })
        .then(function () { busy = false; if (again) { again = false; this.refresh(); } }.bind(this));
    };
  }

  // --- runs page -----------------------------------------------------------------------------
  // The table every 2 s; its counts by status are refreshed by the server at most every 10 s.
  var runs = document.getElementById("runs-live");
  if (runs) {
    var table = new LiveFragment(runs);
    setInterval(function () { if (!document.hidden) { table.refresh(); } }, 2000);
  }

  // --- run page --------------------------------------------------------------------------------
  var run = document.getElementById("run-live");
  if (run) {
    var runId = run.getAttribute("data-run");
    var source = null, timer = null, seen = {}, refused = "", streamError = "";
    var state = document.getElementById("events-state");
    var log = document.querySelector("#events tbody");
    var terminal = {};
    words(run, "data-terminal-types").forEach(function (type) { terminal[type] = true; });

    // A refused cancel's message, shown next to the button (again after each refresh of the fragment).
    var showRefusal = function () {
      var actions = run.querySelector(".actions");
      var old = document.getElementById("action-result");
      if (old) { old.parentNode.removeChild(old); }
      if (refused && actions) {
        actions.appendChild(el("p", { "class": "flash bad", id: "action-result", role: "alert" }, refused));
      }
    };
    var fragment = new LiveFragment(run, function () {
      var head = run.querySelector(".run-head");
      var rebuild = document.getElementById("rebuild");
      if (rebuild && head) {
        var hasTypes = rebuild.querySelector("option") !== null;
        rebuild.hidden = !(hasTypes && head.getAttribute("data-can-rebuild") === "1");
      }
      showRefusal();
    });
    var soon = function () { clearTimeout(timer); timer = setTimeout(fragment.refresh, 150); };

    var addEvent = function (msg) {
      var event;
      try { event = JSON.parse(msg.data); } catch (e) { return; }
      var seq = event.sequence || msg.lastEventId;
      if (seen[seq]) { return; }
      seen[seq] = true;
      var p = event.payload || {};
      var details = [];
      ["step_key", "try", "tool", "reason", "error", "stop_reason"].forEach(function (k) {
        if (p[k] !== undefined && p[k] !== "" && typeof p[k] !== "object") { details.push(k + "=" + p[k]); }
      });
      if (p.error && typeof p.error === "object") { details.push("error=" + (p.error.message || JSON.stringify(p.error))); }
      var row = el("tr", { "data-type": event.type });
      row.appendChild(el("td", {}, String(seq)));
      var t = event.occurred_at ? new Date(event.occurred_at) : null;
      row.appendChild(el("td", { title: event.occurred_at || "" }, t ? t.toLocaleTimeString() : ""));
      row.appendChild(el("td", {}, event.type));
      row.appendChild(el("td", {}, String(event.attempt || "")));
      row.appendChild(el("td", {}, details.join(" ").slice(0, 300)));
      if (log.rows.length < 5000) { log.appendChild(row); }
      if (terminal[event.type]) {
        source.close();
        state.textContent = "The run has ended; the log is complete.";
      } else {
        state.textContent = "live";
      }
      soon();
    };

    var polling = false;
    var pollInstead = function (why) {
      state.textContent = why + "; refreshing every 2 s";
      if (!polling) {
        polling = true;
        setInterval(function () { if (!document.hidden) { fragment.refresh(); } }, 2000);
      }
    };
    // The server's own error on the stream, {"code", "message"}: a refusal (the key was revoked, the run
    // is not the caller's) closes it, anything else (e.g. the server is stopping) ends it and the
    // browser reconnects after the last event it has.
    var REFUSALS = { UNAUTHENTICATED: 1, PERMISSION_DENIED: 1, NOT_FOUND: 1, INVALID_ARGUMENT: 1 };
    var serverError = function (msg) {
      var data = {};
      try { data = JSON.parse(msg.data) || {}; } catch (e) { /* not JSON: say what there is */ }
      streamError = data.message || String(msg.data || "error");
      if (REFUSALS[data.code]) {
        source.close();
        pollInstead("the stream was refused: " + streamError);
      } else {
        state.textContent = "the stream failed: " + streamError + "; reconnecting…";
      }
    };

    if (window.EventSource) {
      source = new EventSource(run.getAttribute("data-events"));
      words(run, "data-event-types").concat(["message"]).forEach(function (type) {
        source.addEventListener(type, addEvent);
      });
      source.addEventListener("runs.error", serverError);
      source.onopen = function () { streamError = ""; state.textContent = "live"; };
      source.onerror = function (e) {  // the connection's own error (or an older server's "error" event)
        if (e && typeof e.data === "string" && e.data) { serverError(e); return; }
        if (source.readyState === EventSource.CLOSED) {  // refused with a status (e.g. no key): poll instead
          pollInstead("the stream closed");
        } else {
          state.textContent = "reconnecting…" + (streamError ? " (the stream failed: " + streamError + ")" : "");
        }
      };
    } else {
      setInterval(fragment.refresh, 2000);
    }

    document.addEventListener("click", function (e) {
      var target = e.target;
      if (target && target.id === "cancel") {
        if (!window.confirm("Cancel run " + runId + "?")) { return; }
        target.disabled = true;
        refused = "";
        showRefusal();
        post("/v1/runs/" + encodeURIComponent(runId) + "/cancel", { reason: "canceled from the dashboard" })
          .then(soon)
          .catch(function (err) {
            target.disabled = false;
            refused = "Cancel refused: " + err.message;
            showRefusal();
            soon();  // the run may have ended meanwhile: show what it is now
          });
      }
    });

    var form = document.getElementById("rebuild-form");
    if (form) {
      var result = document.getElementById("rebuild-result");
      var go = document.getElementById("rebuild-go");
      var body = function (dry) {
        var patch = form.elements.input_patch.value.trim();
        var b = { change_request_type: form.elements.change_request_type.value, dry_run: dry };
        if (patch) { b.input_patch = JSON.parse(patch); }
        return b;
      };
      var show = function (text, cls) {
        result.innerHTML = "";
        result.appendChild(el("p", { "class": "flash " + (cls || "") }, text));
      };
      form.addEventListener("change", function () { go.disabled = true; result.innerHTML = ""; });
      document.getElementById("rebuild-preview").addEventListener("click", function () {
        var b;
        try { b = body(true); } catch (err) { show("The input patch is not JSON: " + err.message, "bad"); return; }
        post("/v1/runs/" + encodeURIComponent(runId) + "/rebuild", b).then(function (data) {
          result.innerHTML = "";
          var table = el("table", { "class": "mini plan" });
          table.appendChild(el("tr")).innerHTML = "<th>Step</th><th>Action</th><th>Why</th>";
          (data.plan || []).forEach(function (s) {
            var tr = el("tr", { "data-step": s.step_key });
            tr.appendChild(el("td", {}, s.step_key));
            tr.appendChild(el("td", { "class": "act-" + s.action }, s.action));
            tr.appendChild(el("td", {}, s.reason || ""));
            table.appendChild(tr);
          });
          result.appendChild(el("p", {}, "Plan (nothing is created until you press Rebuild):"));
          result.appendChild(table);
          go.disabled = false;
        }).catch(function (err) { show("Refused: " + err.message, "bad"); });
      });
      go.addEventListener("click", function () {
        var b;
        try { b = body(false); } catch (err) { show("The input patch is not JSON: " + err.message, "bad"); return; }
        go.disabled = true;
        post("/v1/runs/" + encodeURIComponent(runId) + "/rebuild", b).then(function (data) {
          window.location.href = "/runs/" + encodeURIComponent(data.run.run_id);
        }).catch(function (err) { go.disabled = false; show("Refused: " + err.message, "bad"); });
      });
    }
  }
})();
