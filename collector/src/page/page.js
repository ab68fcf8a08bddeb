// Keeps the fleet page current without reloading it: every few seconds the server-rendered
// part of the page is fetched again and swapped in. The server escapes everything it renders,
// and the Content-Security-Policy forbids inline script, so the swap adds no script.
// The one thing that writes: the instance page's diagnostics button (see page/mod.rs for why
// it sends the X-Phoenix-Page header).
(function () {
  'use strict';
  var live = document.getElementById('live');
  var status = document.getElementById('status');
  if (!live || !status) { return; }
  var src = live.getAttribute('data-src');
  var every = parseInt(live.getAttribute('data-every'), 10) || 3000;
  var busy = false;

  function say(text, bad) {
    status.textContent = text;
    status.className = bad ? 'status bad' : 'status';
  }

  // Sections a reader opened (or closed) stay so across a swap.
  function detailsState() {
    var s = {};
    Array.prototype.forEach.call(live.querySelectorAll('details[id]'), function (d) { s[d.id] = d.open; });
    return s;
  }

  function refresh() {
    // A hidden tab (a phone in a pocket) does not poll.
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(src, { credentials: 'same-origin', cache: 'no-store', headers: { 'Accept': 'text/html' } })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) {
          throw new Error('access lost: open the page again with ?token=READER_TOKEN');
        }
        if (r.status === 404) { throw new Error('no longer known to the collector'); }
        if (!r.ok) { throw new Error('collector answered HTTP ' + r.status); }
        return r.text();
      })
      .then(function (html) {
        var open = detailsState();
        live.innerHTML = html;
        Object.keys(open).forEach(function (id) {
          var d = document.getElementById(id);
          if (d && d.tagName === 'DETAILS') { d.open = open[id]; }
        });
        say('live, updated ' + new Date().toLocaleTimeString(), false);
      })
      .catch(function (e) {
        say((e && e.message) ? e.message : 'collector unreachable', true);
      })
      .then(function () { busy = false; });
  }

  // The diagnostics button, by delegation: the swap replaces it every few seconds.
  live.addEventListener('click', function (ev) {
    var b = ev.target.closest ? ev.target.closest('#diag-request') : null;
    if (!b || b.disabled) { return; }
    var out = document.getElementById('diag-status');
    b.disabled = true;
    if (out) { out.textContent = 'asking…'; }
    fetch(b.getAttribute('data-post'), {
      method: 'POST',
      credentials: 'same-origin',
      cache: 'no-store',
      headers: { 'X-Phoenix-Page': '1' }
    })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (j) { return { ok: r.ok, status: r.status, j: j }; });
      })
      .then(function (r) {
        if (out) {
          out.textContent = r.ok
            ? 'Request ' + r.j.request_id + ' sent: the agent answers with its next report.'
            : 'Not sent (HTTP ' + r.status + '): ' + (r.j.error || 'no reason given');
        }
        if (r.ok) { setTimeout(refresh, 200); } else { b.disabled = false; }
      })
      .catch(function () {
        if (out) { out.textContent = 'Not sent: collector unreachable'; }
        b.disabled = false;
      });
  });

  setInterval(refresh, every);
  document.addEventListener('visibilitychange', refresh);
})();
