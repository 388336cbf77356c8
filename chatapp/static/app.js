// chatapp's page script: sends messages through the JSON API (login cookie + CSRF header)
// and streams replies into the page. Message text only ever goes in as text; the only HTML
// it inserts is what our server rendered and sanitized (a reply, or its text so far).
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrfToken = csrfMeta ? csrfMeta.content : "";

  function apiPost(url, body, extraHeaders) {
    const headers = { Accept: "application/json", "X-CSRFToken": csrfToken, ...extraHeaders };
    const options = { method: "POST", credentials: "same-origin", headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(url, options);
  }

  // A 401 on a page means its login has ended (logged out from another browser, expired,
  // account deleted): say so, with a way back, never the API's text about Bearer tokens.
  const SESSION_ENDED = "Your session has ended — log in again";
  const loginMeta = document.querySelector('meta[name="login-url"]');

  function loginUrl() {
    const base = loginMeta ? loginMeta.content : "/login";
    return base + "?next=" + encodeURIComponent(window.location.pathname + window.location.search);
  }

  // The notice as nodes (a text and a link), for an element that shows errors.
  function showSessionEnded(element) {
    const link = document.createElement("a");
    link.href = loginUrl();
    link.className = "session-ended-login";
    link.textContent = "log in again";
    element.replaceChildren("Your session has ended — ", link);
  }

  async function errorMessage(response) {
    if (response.status === 401) return SESSION_ENDED;
    try {
      const body = await response.json();
      let message = body.error.message;
      if (body.error.code === "bad_request" && /CSRF/i.test(message)) {
        message += " Reload the page and try again.";
      }
      return message;
    } catch (_) {
      return "The server answered " + response.status + ". Try again.";
    }
  }

  // A new key per message: the server stores a message once however often it is sent
  // with the same key. randomUUID only exists on https and localhost pages.
  function newIdempotencyKey() {
    if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  }

  function pause(milliseconds) {
    return new Promise((resolve) => setTimeout(resolve, milliseconds));
  }

  // GET a JSON resource of the API with the login cookie (the answer, as apiPost's).
  function apiGet(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  }

  // Its body, or null when the answer is not a success (a network failure throws).
  async function getJson(url) {
    const response = await apiGet(url);
    return response.ok ? response.json() : null;
  }

  // Enter sends the form, Shift+Enter (or Enter while an input method composes) is a new line.
  function sendOnEnter(input, form) {
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (!input.disabled) form.requestSubmit();
      }
    });
  }

  // Put text on the clipboard; false when the browser refuses (no permission, not https).
  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) {
      return false;
    }
  }

  // A text button's Copy (a code block's, a new token's): its label says how it went.
  async function copyWithLabel(button, text) {
    button.textContent = (await copyText(text)) ? "Copied" : "Press Ctrl+C";
  }

  // Each code block in a reply gets a Copy button, next to its language. The page adds it,
  // so the sanitizer never has to let a button into a reply's HTML.
  function addCodeCopyButtons(root) {
    root.querySelectorAll(".markdown .code-header").forEach((header) => {
      if (header.querySelector(".code-copy")) return;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "code-copy";
      button.textContent = "Copy";
      button.dataset.copyCode = "";
      header.append(button);
    });
  }

  document.addEventListener("click", (event) => {
    const code = event.target.closest("button[data-copy-code]");
    if (code) {
      const pre = code.closest(".code-block")?.querySelector("pre");
      if (pre) copyWithLabel(code, pre.textContent);
    }
  });

  // Show sanitized HTML our server rendered (a reply, or its text so far) in ``box``.
  function showRendered(box, html) {
    const holder = document.createElement("template");
    holder.innerHTML = html; // our own fragment, sanitized server-side
    box.replaceChildren(holder.content);
    addCodeCopyButtons(box);
  }

  // While a reply streams, its text so far is shown rendered by the server (the page's
  // /text view), as it will look when finished: no raw "**" or fences that jump at the end.
  // New text from the stream only asks for a fresh rendering: one request at a time, at
  // most every RENDER_INTERVAL ms (the rate the server commits a reply's text at).
  const RENDER_INTERVAL = 250;
  function liveRendering(box, url, shown) {
    let generation = 0;
    let busy = false;
    let wanted = false;
    let stopped = false;
    let last = 0;
    let timer = null;
    let raw = "";

    async function render() {
      busy = true;
      wanted = false;
      last = Date.now();
      const mine = generation;
      let html = null;
      try {
        // redirect "manual": a login page (this browser was logged out) is no rendering.
        const response = await fetch(url, {
          credentials: "same-origin",
          headers: { Accept: "text/html" },
          redirect: "manual",
        });
        if (response.ok) html = await response.text();
      } catch (_) {
        html = null;
      }
      busy = false;
      if (stopped || mine !== generation) return;
      if (html === null) {
        // No rendering to be had: the text as it came, until the next one works.
        box.classList.remove("markdown");
        box.textContent = raw;
      } else {
        box.classList.add("markdown");
        showRendered(box, html);
      }
      shown(box.textContent.length > 0);
      if (wanted) schedule();
    }

    function schedule() {
      wanted = true;
      if (stopped || busy || timer !== null) return;
      timer = setTimeout(() => {
        timer = null;
        render();
      }, Math.max(0, last + RENDER_INTERVAL - Date.now()));
    }

    return {
      received(text) {
        raw += text;
        schedule();
      },
      // The reply starts over (regenerated elsewhere): forget what was shown.
      reset() {
        generation += 1;
        raw = "";
        box.replaceChildren();
      },
      stop() {
        stopped = true;
        clearTimeout(timer);
        return raw;
      },
    };
  }

  const ENDED = {
    complete: "The reply is complete.",
    stopped: "The reply was stopped.",
  };

  function setUpChat(chat) {
    const apiBase = chat.dataset.apiMessagesUrl;
    const pageBase = chat.dataset.pageMessagesUrl;
    const scroller = document.getElementById("messages");
    const list = document.getElementById("message-list");
    const form = document.getElementById("composer");
    const input = form.querySelector("textarea");
    const sendButton = form.querySelector('button[type="submit"]');
    const errorBox = document.getElementById("composer-error");
    const status = document.getElementById("chat-status");
    const hint = document.getElementById("composer-hint");
    const sendHint = hint.textContent;
    const counter = setUpCounter(input, document.getElementById("composer-counter"));

    function showError(text) {
      if (text === SESSION_ENDED) showSessionEnded(errorBox);
      else errorBox.textContent = text;
    }

    // The box is disabled while a message is sent and its reply written: the server takes
    // one at a time. While the reply is written, Send becomes Stop.
    const state = { posting: false, running: null, stopping: false };
    let refocus = false;
    function update() {
      const busy = state.posting || state.running !== null;
      const stop = state.running !== null;
      input.disabled = busy;
      sendButton.type = stop ? "button" : "submit";
      sendButton.textContent = stop ? "Stop" : "Send";
      sendButton.classList.toggle("stop", stop);
      sendButton.disabled = state.posting || state.stopping;
      // Busy while a request is out; the reply being written carries its own aria-busy.
      form.setAttribute("aria-busy", String(state.posting || state.stopping));
      hint.textContent = stop ? "Escape stops the reply." : sendHint;
      if (!busy && refocus) {
        refocus = false;
        input.focus();
      }
    }

    function setPosting(posting) {
      if (posting) refocus = refocus || form.contains(document.activeElement);
      state.posting = posting;
      update();
    }

    function setRunning(replyId) {
      state.running = replyId;
      state.stopping = false;
      update();
    }

    function nearBottom() {
      return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
    }

    function scrollToBottom() {
      scroller.scrollTop = scroller.scrollHeight;
    }

    function fromTemplate(id) {
      return document.getElementById(id).content.firstElementChild.cloneNode(true);
    }

    function appendMessage(templateId, data) {
      const item = fromTemplate(templateId);
      item.id = "message-" + data.id;
      item.dataset.messageId = data.id;
      item.querySelector(".text").textContent = data.content;
      // The template's Edit points at a stand-in message: this one's form instead.
      item.querySelector("a.edit-message")?.setAttribute("href", pageBase + "/" + data.id + "/edit");
      list.append(item);
      const empty = document.getElementById("empty-chat");
      if (empty) empty.remove();
      return item;
    }

    // The latest reply is the only one that can be regenerated.
    function dropRegenerateButtons() {
      list.querySelectorAll(".regenerate-form").forEach((node) => node.remove());
    }

    function markFailed(item, text) {
      item.dataset.status = "failed";
      item.removeAttribute("aria-busy");
      item.querySelector(".thinking")?.setAttribute("hidden", "");
      const note = document.createElement("p");
      note.className = "message-error";
      note.setAttribute("role", "alert");
      note.textContent = text;
      item.querySelector(".bubble").append(note);
    }

    function markStopped(item) {
      const note = document.createElement("p");
      note.className = "message-note";
      note.textContent = "Stopped";
      item.querySelector(".bubble").append(note);
    }

    // When a reply ends, swap in the server's rendering: sanitized Markdown, error, Regenerate.
    async function finish(item, replyId, result, raw) {
      const stick = nearBottom();
      try {
        const response = await fetch(pageBase + "/" + replyId, {
          credentials: "same-origin",
          headers: { Accept: "text/html" },
        });
        if (!response.ok) throw new Error("HTTP " + response.status);
        const holder = document.createElement("template");
        holder.innerHTML = await response.text(); // our own fragment, sanitized server-side
        const fresh = holder.content.querySelector("li.message");
        if (!fresh) throw new Error("no message in the fragment");
        addCodeCopyButtons(fresh);
        item.replaceWith(fresh);
      } catch (_) {
        const text = item.querySelector(".text");
        text.classList.remove("markdown");
        text.textContent = raw;
        item.dataset.status = result.status || "complete";
        item.removeAttribute("aria-busy");
        item.querySelector(".thinking")?.setAttribute("hidden", "");
        if (result.error) markFailed(item, "The reply failed: " + result.error);
        if (result.status === "stopped") markStopped(item);
      }
      if (stick) scrollToBottom();
    }

    function stream(item, replyId) {
      state.posting = false;
      setRunning(replyId);
      const text = item.querySelector(".text");
      const thinking = item.querySelector(".thinking");
      // A reloaded page shows the text so far, rendered by the server, until a newer rendering.
      thinking.hidden = text.textContent.length > 0;
      item.dataset.status = "pending";
      item.setAttribute("aria-busy", "true");
      status.textContent = "The assistant is thinking…";

      let stick = false;
      const rendering = liveRendering(text, pageBase + "/" + replyId + "/text", (hasText) => {
        thinking.hidden = hasText;
        if (stick) scrollToBottom();
      });
      const source = new EventSource(apiBase + "/" + replyId + "/stream");
      source.addEventListener("message", (event) => {
        if (!event.data) return;
        stick = nearBottom();
        item.dataset.status = "streaming";
        // Only asks for a rendering: the text itself never enters the page as HTML.
        rendering.received(event.data);
      });
      source.addEventListener("reset", () => {
        // The reply was regenerated elsewhere: its text starts over.
        rendering.reset();
        thinking.hidden = false;
      });
      source.addEventListener("done", async (event) => {
        source.close(); // otherwise EventSource reconnects when the server ends the stream
        const raw = rendering.stop();
        let result = {};
        try {
          result = JSON.parse(event.data);
        } catch (_) {
          result = {};
        }
        if (result.status === "unauthorized") {
          // This browser was logged out (here or from another one): the reply goes on
          // without us, and the page's forms would fail too.
          markFailed(item, "You were logged out. Log in again to see this reply.");
          status.textContent = "You were logged out.";
          showError(SESSION_ENDED);
          setRunning(null);
          return;
        }
        await finish(item, replyId, result, raw);
        status.textContent = ENDED[result.status] || "The reply failed.";
        setRunning(null);
        chat.dispatchEvent(new CustomEvent("chatapp:reply-ended", { detail: result }));
      });
      source.addEventListener("error", () => {
        // While the connection is open or reconnecting, the browser resumes by itself
        // (Last-Event-ID). CLOSED means the server refused it: logged out, or deleted.
        if (source.readyState === EventSource.CLOSED) {
          rendering.stop();
          markFailed(item, "Lost the connection to this reply. Reload the page to see it.");
          setRunning(null);
          // EventSource does not say why; a 401 from the messages list says the login ended.
          apiGet(apiBase)
            .then((response) => {
              if (response.status === 401) showError(SESSION_ENDED);
            })
            .catch(() => {});
        }
      });
    }

    // Stop the reply being written. Its stream then ends with "done" (status "stopped"),
    // which swaps in the stored reply; if it finished meanwhile (409), "done" says so too.
    async function stopReply() {
      const replyId = state.running;
      if (replyId === null || state.stopping) return;
      refocus = refocus || form.contains(document.activeElement);
      state.stopping = true;
      update();
      let response = null;
      try {
        response = await apiPost(apiBase + "/" + replyId + "/stop");
      } catch (_) {
        response = null;
      }
      if (state.running !== replyId) return; // already ended
      if (response && (response.ok || response.status === 409)) return;
      state.stopping = false;
      update();
      showError(response ? await errorMessage(response) : "Could not reach the server to stop the reply. Try again.");
    }

    sendButton.addEventListener("click", (event) => {
      if (state.running === null) return; // Send: the form's submit handles it
      // The second click of a double click on Send is not a Stop.
      if (event.detail > 1) return;
      stopReply();
    });

    // Escape stops the reply from anywhere on the page, unless it closes a menu (setUpMenus
    // takes that Escape first) or a dialog.
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || event.defaultPrevented || event.isComposing) return;
      if (state.running === null || document.querySelector("dialog[open]")) return;
      event.preventDefault();
      stopReply();
    });

    // A failed try of a new message is retried with the same key and content (and so is
    // sending the same text again by hand): the server never stores it twice.
    let draft = null;
    async function postMessage(content) {
      if (!draft || draft.content !== content) draft = { content, key: newIdempotencyKey() };
      const headers = { "Idempotency-Key": draft.key };
      for (let tries = 1; ; tries++) {
        let response = null;
        try {
          response = await apiPost(apiBase, { content }, headers);
        } catch (_) {
          response = null; // no answer: the message may or may not have been stored
        }
        // No answer, or the database briefly unavailable: once more, after a second.
        if (tries === 1 && (response === null || response.status === 503)) {
          await pause(1000);
          continue;
        }
        if (response && response.status === 202) draft = null;
        return response;
      }
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (state.posting || state.running !== null) return;
      const content = input.value;
      if (!content.trim()) {
        showError("Write a message first.");
        return;
      }
      // Too long: say so and keep the text as it is (never cut it down silently).
      if (counter.over()) {
        showError(counter.overMessage());
        input.focus();
        return;
      }
      showError("");
      setPosting(true);
      const response = await postMessage(content);
      if (response === null) {
        showError("Could not reach the server. Check your connection and try again.");
        setPosting(false);
        return;
      }
      if (response.status !== 202) {
        showError(await errorMessage(response));
        setPosting(false);
        return;
      }
      const posted = await response.json();
      input.value = "";
      counter.update();
      dropRegenerateButtons();
      appendMessage("user-message-template", posted.message);
      const item = appendMessage("assistant-message-template", posted.reply);
      scrollToBottom();
      stream(item, posted.reply.id);
    });

    sendOnEnter(input, form);

    list.addEventListener("submit", async (event) => {
      const regenerate = event.target.closest(".regenerate-form");
      if (!regenerate) return;
      event.preventDefault();
      const item = regenerate.closest("li.message");
      const replyId = item.dataset.messageId;
      if (state.posting || state.running !== null) return;
      showError("");
      setPosting(true);
      let response;
      try {
        response = await apiPost(apiBase + "/" + replyId + "/regenerate");
      } catch (_) {
        response = null;
      }
      if (!response || response.status !== 202) {
        showError(response ? await errorMessage(response) : "Could not reach the server. Try again.");
        setPosting(false);
        return;
      }
      // A new version beside the old reply: it takes the old one's place in the page.
      const version = await response.json();
      const fresh = fromTemplate("assistant-message-template");
      fresh.id = "message-" + version.id;
      fresh.dataset.messageId = version.id;
      item.replaceWith(fresh);
      stream(fresh, version.id);
    });

    setUpEdits({ list, apiBase, state, setPosting, showError, errorMessage, appendMessage, stream, scrollToBottom });

    // A reply still being written when the page loaded (a reload mid-reply): resume it.
    const active = list.querySelector(
      'li.message.assistant[data-status="pending"], li.message.assistant[data-status="streaming"]'
    );
    if (active) stream(active, active.dataset.messageId);
    // Long histories open at the newest message.
    scrollToBottom();
    // Ready to type when a chat opens; not on touch screens, where focus pops up the
    // keyboard over the conversation, nor over an open menu or a form's error.
    const touch = window.matchMedia("(pointer: coarse)").matches;
    if (!touch && !input.disabled && !document.querySelector("details[open]")) input.focus({ preventScroll: true });
  }

  // The characters a message may have (as the server counts them: code points, not UTF-16
  // units); a counter appears near the limit and says so plainly when over it.
  function setUpCounter(input, box) {
    const max = Number(input.dataset.maxLength) || 0;
    const format = (n) => n.toLocaleString("en");
    const length = () => {
      const value = input.value;
      // Cheap for the usual short message; exact (code points) when it could matter.
      return value.length * 2 < max * 0.9 ? value.length : Array.from(value).length;
    };
    const counter = {
      over: () => max > 0 && length() > max,
      overMessage: () =>
        "Your message is " + format(length() - max) + " characters too long (the limit is " +
        format(max) + "). Shorten it or split it into several messages.",
      update() {
        if (!box || !max) return;
        const used = length();
        const near = used >= max * 0.9;
        box.hidden = !near;
        box.classList.toggle("over", used > max);
        input.setAttribute("aria-invalid", String(used > max));
        box.textContent = !near
          ? ""
          : used > max
            ? format(used) + " / " + format(max) + " characters: " + format(used - max) + " over the limit"
            : format(used) + " / " + format(max) + " characters";
      },
    };
    input.addEventListener("input", () => counter.update());
    counter.update();
    return counter;
  }

  // Edit one of your messages in place: Save sends the new version (a new branch, with its
  // own reply, streamed like a sent message); the rest of the old branch leaves the page.
  // Without JavaScript the Edit link opens a form page instead.
  function setUpEdits(chat) {
    const { list, apiBase, state } = chat;
    list.addEventListener("click", (event) => {
      const link = event.target.closest("a.edit-message");
      if (!link) return;
      event.preventDefault();
      const item = link.closest("li.message");
      if (item.querySelector(".edit-box") || state.posting || state.running !== null) return;
      const text = item.querySelector(".text");
      const box = document.createElement("form");
      box.className = "edit-box";
      const area = document.createElement("textarea");
      area.className = "input";
      area.value = text.textContent;
      area.setAttribute("aria-label", "Edit message");
      const save = document.createElement("button");
      save.type = "submit";
      save.className = "button primary small";
      save.textContent = "Save";
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.className = "button subtle small";
      cancel.textContent = "Cancel";
      const error = document.createElement("p");
      error.className = "error-text";
      error.setAttribute("role", "alert");
      box.append(area, save, cancel, error);
      text.hidden = true;
      text.after(box);
      area.focus();
      cancel.addEventListener("click", () => {
        box.remove();
        text.hidden = false;
        link.focus();
      });
      box.addEventListener("submit", async (submitted) => {
        submitted.preventDefault();
        if (state.posting || state.running !== null) return;
        if (!area.value.trim()) {
          error.textContent = "Write a message first.";
          return;
        }
        chat.setPosting(true);
        let response = null;
        try {
          response = await apiPost(apiBase + "/" + item.dataset.messageId + "/edit", { content: area.value });
        } catch (_) {
          response = null;
        }
        if (!response || response.status !== 202) {
          error.textContent = response ? await chat.errorMessage(response) : "Could not reach the server. Try again.";
          chat.setPosting(false);
          return;
        }
        const posted = await response.json();
        // The old branch from this message on is no longer the one shown.
        while (item.nextElementSibling) item.nextElementSibling.remove();
        item.remove();
        list.querySelectorAll(".regenerate-form").forEach((node) => node.remove());
        const message = chat.appendMessage("user-message-template", posted.message);
        addVersions(message, posted.message.siblings);
        const reply = chat.appendMessage("assistant-message-template", posted.reply);
        chat.scrollToBottom();
        chat.stream(reply, posted.reply.id);
      });
    });
  }

  // The ‹ 2/3 › switcher of a message added by the script, from the page's template.
  function addVersions(item, siblings) {
    const template = document.getElementById("versions-template");
    if (!template || !siblings || siblings.count < 2) return;
    const row = template.content.firstElementChild.cloneNode(true);
    const previous = row.querySelector(".version-previous");
    const next = row.querySelector(".version-next");
    previous.value = siblings.previous_id || "";
    previous.disabled = !siblings.previous_id;
    next.value = siblings.next_id || "";
    next.disabled = !siblings.next_id;
    row.querySelector(".version-position").textContent = siblings.index + "/" + siblings.count;
    const actions = item.querySelector(".message-actions");
    if (actions) actions.prepend(row);
    else item.append(row);
  }

  function setUpRename() {
    const menu = document.querySelector("details.rename");
    if (!menu) return;
    menu.addEventListener("toggle", () => {
      if (menu.open) menu.querySelector("input[name=title]").select();
    });
  }

  function setUpCopyButtons() {
    // A message's Copy: the text as written (a reply's Markdown, not its rendering). One
    // listener for all, so replies swapped in later have it too.
    document.addEventListener("click", async (event) => {
      const button = event.target.closest("[data-copy-message]");
      if (!button) return;
      const text = button.closest("li.message")?.querySelector(".text");
      if (!text) return;
      const raw = button.dataset.raw !== undefined ? button.dataset.raw : text.textContent;
      const copied = await copyText(raw);
      button.dataset.copied = String(copied);
      const icon = button.querySelector("use");
      if (copied && icon) icon.setAttribute("href", "#icon-check");
      const label = copied ? "Copied" : "Could not copy: select the text and press Ctrl+C";
      button.setAttribute("aria-label", label);
      button.title = label;
      clearTimeout(button.copyTimer);
      button.copyTimer = setTimeout(() => {
        delete button.dataset.copied;
        if (icon) icon.setAttribute("href", "#icon-copy");
        button.setAttribute("aria-label", "Copy");
        button.title = "Copy";
      }, 2000);
    });

    document.querySelectorAll("[data-copy]").forEach((button) => {
      button.addEventListener("click", async () => {
        const field = document.getElementById(button.dataset.copy);
        field.select();
        await copyWithLabel(button, field.value);
      });
    });
  }

  // The heading a day goes under, by the browser's own calendar (as pages.date_group does
  // in UTC for the page without a script).
  function dateGroup(day, now) {
    const midnight = (d) => new Date(d.getFullYear(), d.getMonth(), d.getDate());
    const age = Math.round((midnight(now) - midnight(day)) / 86400000);
    if (age <= 0) return "Today";
    if (age === 1) return "Yesterday";
    if (age <= 7) return "Previous 7 days";
    if (age <= 30) return "Previous 30 days";
    const options = day.getFullYear() === now.getFullYear() ? { month: "long" } : { month: "long", year: "numeric" };
    return day.toLocaleDateString("en", options);
  }

  // Regroup the sidebar's entries (newest first) under headings of the user's timezone.
  function groupConversations() {
    const list = document.getElementById("conversation-list");
    if (!list) return;
    const items = Array.from(list.querySelectorAll("li.conversation-item[data-updated]"));
    if (!items.length) return;
    const now = new Date();
    const groups = [];
    for (const item of items) {
      const day = new Date(item.dataset.updated);
      if (Number.isNaN(day.getTime())) return; // keep the server's groups
      const label = dateGroup(day, now);
      if (!groups.length || groups[groups.length - 1].label !== label) groups.push({ label, items: [] });
      groups[groups.length - 1].items.push(item);
    }
    const sections = groups.map((group) => {
      const section = document.createElement("section");
      section.className = "conversation-group";
      const heading = document.createElement("h3");
      heading.className = "group-label";
      heading.textContent = group.label;
      const ul = document.createElement("ul");
      ul.append(...group.items);
      section.append(heading, ul);
      return section;
    });
    list.replaceChildren(...sections);
    list.dataset.grouped = "local";
  }

  // Menus (<details class="menu">: the header's Rename and Model, the sidebar entries'): one
  // open at a time; a click elsewhere or Escape closes them. Escape is taken while the event
  // comes down the page (capture), before Escape-to-stop sees it: an Escape closes a menu and
  // does nothing else, the next one stops a reply.
  function setUpMenus() {
    const menus = () => document.querySelectorAll("details.menu[open]");
    document.addEventListener("toggle", (event) => {
      const opened = event.target;
      if (!(opened instanceof HTMLDetailsElement) || !opened.open) return;
      menus().forEach((menu) => menu !== opened && (menu.open = false));
    }, true);
    document.addEventListener("click", (event) => {
      menus().forEach((menu) => !menu.contains(event.target) && (menu.open = false));
    });
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || event.isComposing) return;
      menus().forEach((menu) => {
        event.preventDefault(); // closing the menu is all this Escape does
        menu.open = false;
        menu.querySelector("summary").focus();
      });
    }, true);
  }

  // An entry's Delete asks in a dialog, then posts (without the script: its own page asks).
  function setUpDeleteDialog() {
    const dialog = document.getElementById("delete-dialog");
    if (!dialog || typeof dialog.showModal !== "function") return;
    const form = dialog.querySelector("form");
    const title = document.getElementById("delete-dialog-title");
    document.addEventListener("click", (event) => {
      const link = event.target.closest("a[data-delete]");
      if (!link) return;
      event.preventDefault();
      link.closest("details")?.removeAttribute("open");
      form.action = link.href; // the confirmation page's address deletes when posted to
      const name = link.closest(".conversation-item")?.querySelector(".conversation-link")?.textContent;
      title.textContent = "Delete “" + (name || "this conversation") + "”?";
      dialog.showModal();
      form.querySelector("[data-close-dialog]").focus();
    });
    form.querySelector("[data-close-dialog]").addEventListener("click", () => dialog.close());
  }

  // Model pickers start with the models the server had at hand; the full list comes from
  // GET /api/v1/models (which may ask the model server) once the picker is shown.
  function setUpModelPickers() {
    document.querySelectorAll("select.model-picker").forEach((select) => {
      let loaded = false;
      async function load() {
        if (loaded) return;
        loaded = true;
        try {
          const body = await getJson(select.dataset.modelsUrl);
          if (body === null) return; // keep the options the page has
          const known = new Set(Array.from(select.options, (option) => option.value));
          for (const model of body.items) {
            if (model.default || known.has(model.id)) continue;
            const option = document.createElement("option");
            option.value = model.id;
            option.textContent = model.id; // text, never HTML
            select.append(option);
          }
        } catch (_) {
          loaded = false; // try again next time
        }
      }
      const menu = select.closest("details");
      if (menu) menu.addEventListener("toggle", () => menu.open && load());
      else load();
    });
  }

  // The first message of a new chat: Enter sends it, Shift+Enter starts a new line.
  function setUpNewChat() {
    const form = document.getElementById("new-chat-form");
    if (form) sendOnEnter(form.querySelector("textarea[name=content]"), form);
  }

  // A new conversation is titled in the background after its first reply: show the title
  // when it arrives (a few looks at the conversation), without a reload.
  function setUpTitleWatch(chat) {
    const heading = document.getElementById("chat-title");
    const url = chat.dataset.apiMessagesUrl.replace(/\/messages$/, "");
    const defaultTitle = heading.textContent;
    chat.addEventListener("chatapp:reply-ended", async () => {
      if (heading.textContent !== defaultTitle) return;
      for (const wait of [500, 1500, 4000]) {
        await pause(wait);
        try {
          const body = await getJson(url);
          if (body === null) return;
          const title = body.title;
          if (title !== defaultTitle) {
            heading.textContent = title;
            document.title = document.title.replace(defaultTitle, title);
            const link = document.querySelector('.conversation-link[aria-current="page"]');
            if (link) link.textContent = title;
            return;
          }
        } catch (_) {
          return;
        }
      }
    });
  }

  const chat = document.getElementById("chat");
  if (chat) setUpChat(chat);
  if (chat && document.getElementById("chat-title").textContent === "New chat") setUpTitleWatch(chat);
  setUpRename();
  setUpCopyButtons();
  addCodeCopyButtons(document);
  groupConversations();
  setUpMenus();
  setUpDeleteDialog();
  setUpModelPickers();
  setUpNewChat();
})();
