// chatapp's page script: sends messages through the JSON API (login cookie + CSRF header)
// and streams replies into the page. Message text only ever goes in as text, never as HTML.
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

  async function errorMessage(response) {
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

    function showError(text) {
      errorBox.textContent = text;
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
    async function finish(item, replyId, result) {
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
        item.replaceWith(fresh);
      } catch (_) {
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
      // The stream sends the stored text first, so a reloaded page starts from empty.
      text.textContent = "";
      thinking.hidden = false;
      item.dataset.status = "pending";
      item.setAttribute("aria-busy", "true");
      status.textContent = "The assistant is thinking…";

      const source = new EventSource(apiBase + "/" + replyId + "/stream");
      source.addEventListener("message", (event) => {
        if (!event.data) return;
        const stick = nearBottom();
        thinking.hidden = true;
        item.dataset.status = "streaming";
        text.append(event.data); // a text node: markup in a reply stays text
        if (stick) scrollToBottom();
      });
      source.addEventListener("reset", () => {
        // The reply was regenerated elsewhere: its text starts over.
        text.textContent = "";
        thinking.hidden = false;
      });
      source.addEventListener("done", async (event) => {
        source.close(); // otherwise EventSource reconnects when the server ends the stream
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
          setRunning(null);
          return;
        }
        await finish(item, replyId, result);
        status.textContent = ENDED[result.status] || "The reply failed.";
        setRunning(null);
        chat.dispatchEvent(new CustomEvent("chatapp:reply-ended", { detail: result }));
      });
      source.addEventListener("error", () => {
        // While the connection is open or reconnecting, the browser resumes by itself
        // (Last-Event-ID). CLOSED means the server refused it: logged out, or deleted.
        if (source.readyState === EventSource.CLOSED) {
          markFailed(item, "Lost the connection to this reply. Reload the page to see it.");
          setRunning(null);
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

    // Escape stops the reply from anywhere on the page, unless it closes a menu or dialog.
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || event.defaultPrevented || event.isComposing) return;
      if (state.running === null || document.querySelector("details[open], dialog[open]")) return;
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
      dropRegenerateButtons();
      appendMessage("user-message-template", posted.message);
      const item = appendMessage("assistant-message-template", posted.reply);
      scrollToBottom();
      stream(item, posted.reply.id);
    });

    // Enter sends, Shift+Enter (or Enter while an input method composes) is a new line.
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (!input.disabled) form.requestSubmit();
      }
    });

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
      const fresh = fromTemplate("assistant-message-template");
      fresh.id = item.id;
      fresh.dataset.messageId = replyId;
      item.replaceWith(fresh);
      stream(fresh, replyId);
    });

    // A reply still being written when the page loaded (a reload mid-reply): resume it.
    const active = list.querySelector(
      'li.message.assistant[data-status="pending"], li.message.assistant[data-status="streaming"]'
    );
    if (active) stream(active, active.dataset.messageId);
    // Long histories open at the newest message.
    scrollToBottom();
  }

  function setUpRename() {
    const menu = document.querySelector("details.rename");
    if (!menu) return;
    menu.addEventListener("toggle", () => {
      if (menu.open) menu.querySelector("input[name=title]").select();
    });
    menu.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && menu.open) {
        event.preventDefault(); // closing the menu is all this Escape does
        menu.open = false;
        menu.querySelector("summary").focus();
      }
    });
  }

  function setUpCopyButtons() {
    document.querySelectorAll("[data-copy]").forEach((button) => {
      button.addEventListener("click", async () => {
        const field = document.getElementById(button.dataset.copy);
        field.select();
        try {
          await navigator.clipboard.writeText(field.value);
          button.textContent = "Copied";
        } catch (_) {
          button.textContent = "Press Ctrl+C";
        }
      });
    });
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
          const response = await fetch(select.dataset.modelsUrl, {
            credentials: "same-origin",
            headers: { Accept: "application/json" },
          });
          if (!response.ok) return; // keep the options the page has
          const known = new Set(Array.from(select.options, (option) => option.value));
          for (const model of (await response.json()).items) {
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
    if (!form) return;
    const input = form.querySelector("textarea[name=content]");
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
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
          const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
          if (!response.ok) return;
          const title = (await response.json()).title;
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
  setUpModelPickers();
  setUpNewChat();
})();
