// astroprep validation pages: sequence player, keyboard shortcuts, copy buttons, select-all.
(function () {
  "use strict";
  var timers = [];

  function initPlayer(root) {
    var frames = root.querySelectorAll("img.seqframe");
    var n = frames.length, k = 0, playing = true;
    var kEl = root.querySelector(".k"), state = root.querySelector(".state"), btn = root.querySelector(".playpause");
    function show(i) {
      frames[k].classList.remove("on");
      k = (i + n) % n;
      frames[k].classList.add("on");
      kEl.textContent = String(k + 1);
    }
    function setPlaying(p) {
      playing = p;
      btn.textContent = p ? "Pause" : "Play";
      state.textContent = p ? "Playing" : "Paused";
    }
    btn.addEventListener("click", function () { setPlaying(!playing); });
    timers.push(setInterval(function () { if (playing && n > 1) show(k + 1); }, 500));
    root.toggle = function () { setPlaying(!playing); };
  }

  function typing(e) {
    var t = e.target;
    return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
  }

  function onKey(e) {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    var el = null;
    if (e.key === "v") el = document.getElementById("validate");
    else if (e.key === "i") el = document.getElementById("invalidate");
    else if (e.key === "ArrowLeft") el = document.getElementById("prev");
    else if (e.key === "ArrowRight") el = document.getElementById("next");
    else if (e.key === " ") {
      var p = document.querySelector(".player");
      if (p && p.toggle) { p.toggle(); e.preventDefault(); }
      return;
    }
    if (el) { e.preventDefault(); el.click(); }
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".player").forEach(initPlayer);
    if (document.getElementById("panel")) document.addEventListener("keydown", onKey);
    var all = document.getElementById("selectall");
    if (all) all.addEventListener("change", function () {
      document.querySelectorAll(".cands input[name=ids]").forEach(function (c) { c.checked = all.checked; });
    });
  });

  document.addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("button.copy");
    if (!b) return;
    var ta = document.getElementById(b.dataset.target);
    if (!ta) return;
    ta.select();
    (navigator.clipboard ? navigator.clipboard.writeText(ta.value) : Promise.reject()).then(
      function () { b.textContent = "Copied"; },
      function () { document.execCommand("copy"); b.textContent = "Copied"; });
  });
})();
