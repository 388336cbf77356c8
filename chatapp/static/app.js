// chatapp's page script: sends messages through the JSON API (login cookie + CSRF header)
// and streams replies into the page. Message text only ever goes in as text, never as HTML.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrfToken = csrfMeta ? csrfMeta.content : "";

  function apiPost(url, body) {
    const headers = { Accept: "application/json", "X-CSRFToken": csrfToken };
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

    function showError(text) {
      errorBox.textContent = text;
    }

    // Disabled while a message is sent and its reply written: the server takes one at a time.
    let refocus = false;
    function setBusy(busy) {
      if (busy) refocus = refocus || form.contains(document.activeElement);
      input.disabled = busy;
      sendButton.disabled = busy;
      form.setAttribute("aria-busy", String(busy));
      if (!busy && refocus) {
        refocus = false;
        input.focus();
      }
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
        if (result.error) markFailed(item, "The reply failed: " + result.error);
      }
      if (stick) scrollToBottom();
    }

    function stream(item, replyId) {
      setBusy(true);
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
          setBusy(false);
          return;
        }
        await finish(item, replyId, result);
        status.textContent = result.status === "complete" ? "The reply is complete." : "The reply failed.";
        setBusy(false);
      });
      source.addEventListener("error", () => {
        // While the connection is open or reconnecting, the browser resumes by itself
        // (Last-Event-ID). CLOSED means the server refused it: logged out, or deleted.
        if (source.readyState === EventSource.CLOSED) {
          markFailed(item, "Lost the connection to this reply. Reload the page to see it.");
          setBusy(false);
        }
      });
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const content = input.value;
      if (!content.trim()) {
        showError("Write a message first.");
        return;
      }
      showError("");
      setBusy(true);
      let response;
      try {
        response = await apiPost(apiBase, { content });
      } catch (_) {
        showError("Could not reach the server. Check your connection and try again.");
        setBusy(false);
        return;
      }
      if (response.status !== 202) {
        showError(await errorMessage(response));
        setBusy(false);
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
      showError("");
      setBusy(true);
      let response;
      try {
        response = await apiPost(apiBase + "/" + replyId + "/regenerate");
      } catch (_) {
        response = null;
      }
      if (!response || response.status !== 202) {
        showError(response ? await errorMessage(response) : "Could not reach the server. Try again.");
        setBusy(false);
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
      if (event.key === "Escape") {
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

  const chat = document.getElementById("chat");
  if (chat) setUpChat(chat);
  setUpRename();
  setUpCopyButtons();
})();
