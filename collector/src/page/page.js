// Keeps the fleet page current without reloading it: every few seconds the server-rendered
// part of the page is fetched again and swapped in. The server escapes everything it renders,
// and the Content-Security-Policy forbids inline script, so the swap adds no script.
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
        live.innerHTML = html;
        say('live, updated ' + new Date().toLocaleTimeString(), false);
      })
      .catch(function (e) {
        say((e && e.message) ? e.message : 'collector unreachable', true);
      })
      .then(function () { busy = false; });
  }

  setInterval(refresh, every);
  document.addEventListener('visibilitychange', refresh);
})();
