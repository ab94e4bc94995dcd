// Thunderbird's side of tests/integration/thunderbird.py, run in its chrome context through
// Marionette. Each call is `run(step, args)`; every step waits for Thunderbird to finish its
// IMAP or POP3 work and returns plain JSON.
const { MailServices } = ChromeUtils.importESModule("resource:///modules/MailServices.sys.mjs");

function server() { return MailServices.accounts.accounts[0].incomingServer; }

function pathOf(folder) {
  const names = [];
  for (let f = folder; f && !f.isServer; f = f.parent) names.unshift(f.name);
  return names.join("/");
}

function folderAt(path) {
  const folder = server().rootFolder.descendants.find(f => pathOf(f) == path);
  if (!folder) throw new Error("Thunderbird has no folder " + path);
  return folder;
}

function urlListener(done) {
  return { OnStartRunningUrl() {}, OnStopRunningUrl(url, status) { done(status); } };
}

function copyListener(done) {
  return {
    QueryInterface: ChromeUtils.generateQI(["nsIMsgCopyServiceListener"]),
    onStartCopy() {}, onProgress() {}, setMessageKey() {},
    getMessageId() { return null; },
    onStopCopy(status) { done(status); },
  };
}

function untilUrlDone(start) {
  return new Promise(resolve => start(urlListener(resolve)));
}

function untilCopied(start) {
  return new Promise(resolve => start(copyListener(resolve)));
}

async function until(predicate, what) {
  for (let i = 0; i < 200; i++) {
    if (predicate()) return;
    await new Promise(r => setTimeout(r, 50));
  }
  throw new Error("timed out waiting for " + what);
}

function update(folder) {
  return untilUrlDone(l =>
    folder.QueryInterface(Ci.nsIMsgImapMailFolder).updateFolderWithListener(null, l));
}

function message(folder, messageId) {
  const header = [...folder.messages].find(h => h.messageId == messageId);
  if (!header) throw new Error(pathOf(folder) + " has no message " + messageId);
  return header;
}

const FLAG_NAMES = { Read: "\\Seen", Marked: "\\Flagged", Replied: "\\Answered" };

function describe(header) {
  const flags = Object.entries(FLAG_NAMES)
    .filter(([name]) => header.flags & Ci.nsMsgMessageFlags[name]).map(([, flag]) => flag);
  const keywords = header.getStringProperty("keywords").split(" ").filter(k => k);
  return { subject: header.mime2DecodedSubject, flags: [...flags, ...keywords].sort() };
}

const steps = {
  async trustCertificate({ host, port, pem }) {
    // What a user does on a server with a self-signed certificate: a permanent exception
    // for this host and port ("Confirm Security Exception").
    const base64 = pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
    const certificate = Cc["@mozilla.org/security/x509certdb;1"]
      .getService(Ci.nsIX509CertDB).constructX509FromBase64(base64);
    Cc["@mozilla.org/security/certoverride;1"].getService(Ci.nsICertOverrideService)
      .rememberValidityOverride(host, port, {}, certificate, false);
    return 0;
  },

  async login({ host, user, password }) {
    // Where Thunderbird looks for the password: imap://host or, for POP3, mailbox://host.
    const origin = `${server().localStoreType}://${host}`;
    const login = Cc["@mozilla.org/login-manager/loginInfo;1"].createInstance(Ci.nsILoginInfo);
    login.init(origin, null, origin, user, password, "", "");
    await Services.logins.addLoginAsync(login);
    if (server().type != "imap") return 0;
    return untilUrlDone(l => MailServices.imap.discoverAllFolders(server().rootFolder, l, null));
  },

  // POP3: fetch new mail into the account's local Inbox, keeping it on the server or not.
  async getMail({ leaveOnServer }) {
    const pop3 = server().QueryInterface(Ci.nsIPop3IncomingServer);
    pop3.leaveMessagesOnServer = leaveOnServer;
    const inbox = server().rootFolder.getFolderWithFlags(Ci.nsMsgFolderFlags.Inbox);
    const status = await untilUrlDone(l => MailServices.pop3.GetNewMail(null, l, inbox, pop3));
    if (status) throw new Error("getting new mail: " + status);
    return Object.fromEntries([...inbox.messages].map(h => [h.messageId, describe(h)]));
  },

  async view() {
    const out = {};
    for (const folder of server().rootFolder.descendants) {
      const status = await update(folder);
      if (status) throw new Error("updating " + pathOf(folder) + ": " + status);
      out[pathOf(folder)] = Object.fromEntries(
        [...folder.messages].map(h => [h.messageId, describe(h)]));
    }
    return out;
  },

  async mark({ folder, messageId, read, flagged, keyword }) {
    const f = folderAt(folder);
    const header = message(f, messageId);
    if (read !== undefined) f.markMessagesRead([header], read);
    if (flagged !== undefined) f.markMessagesFlagged([header], flagged);
    if (keyword) f.addKeywordsToMessages([header], keyword);
    return 0;
  },

  async transfer({ source, target, messageId, move }) {
    const from = folderAt(source);
    return untilCopied(l => MailServices.copy.copyMessages(
      from, [message(from, messageId)], folderAt(target), move, l, null, false));
  },

  async trash({ folder, messageId }) {
    const f = folderAt(folder);
    return untilCopied(l => f.deleteMessages([message(f, messageId)], null, false, false, l, false));
  },

  async createFolder({ parent, child }) {
    const f = folderAt(parent);
    f.createSubfolder(child, null);
    await until(() => f.subFolders.some(c => c.name == child), "folder " + child);
    return 0;
  },

  async renameFolder({ folder, newName }) {
    const f = folderAt(folder);
    const parent = f.parent, oldName = f.name;
    f.rename(newName, null);
    await until(() => parent.subFolders.some(c => c.name == newName)
                      && !parent.subFolders.some(c => c.name == oldName), "folder " + newName);
    return 0;
  },

  async deleteFolder({ folder }) {
    // Thunderbird's "Delete Folder" once confirmed: the folder moves into Trash (a RENAME on
    // the server). deleteSelf would first ask the user.
    const f = folderAt(folder), parent = f.parent, name = f.name;
    const trash = server().rootFolder.getFolderWithFlags(Ci.nsMsgFolderFlags.Trash);
    const status = await untilCopied(l => MailServices.copy.copyFolder(f, trash, true, l, null));
    await until(() => !parent.subFolders.some(c => c.name == name), folder + " gone");
    return status;
  },

  async emptyTrash() {
    const trash = server().rootFolder.getFolderWithFlags(Ci.nsMsgFolderFlags.Trash);
    trash.emptyTrash(null);
    await until(() => !trash.hasSubFolders && trash.getTotalMessages(false) == 0,
                "an empty Trash");
    return 0;
  },

  // Write and send a message the way the compose window does: through the identity's
  // outgoing server, a copy saved to Sent (an IMAP APPEND) once it has gone.
  async send({ to, subject, body }) {
    const identity = MailServices.accounts.accounts[0].defaultIdentity;
    const fields = Cc["@mozilla.org/messengercompose/composefields;1"]
      .createInstance(Ci.nsIMsgCompFields);
    fields.from = identity.email;
    fields.to = to;
    fields.subject = subject;
    fields.body = body;
    const sender = Cc["@mozilla.org/messengercompose/send;1"].createInstance(Ci.nsIMsgSend);
    return new Promise((resolve, reject) => {
      const listener = {
        QueryInterface: ChromeUtils.generateQI(["nsIMsgSendListener",
                                                "nsIMsgCopyServiceListener"]),
        onStartSending() {}, onProgress() {}, onStatus() {}, onGetDraftFolderURI() {},
        onStartCopy() {}, setMessageKey() {}, getMessageId() { return null; },
        onStopSending(messageId, status, text) {
          if (status) reject(new Error(`sending failed: ${status} ${text}`));
        },
        onSendNotPerformed(messageId, status) { reject(new Error("not sent: " + status)); },
        onTransportSecurityError(messageId, status) {
          reject(new Error("TLS refused: " + status));
        },
        onStopCopy(status) { resolve(status); },  // the copy in Sent is saved
      };
      sender.createAndSendMessage(null, identity, "", fields, false, false,
                                  Ci.nsIMsgSend.nsMsgDeliverNow, null, "text/plain", body,
                                  null, null, listener, null, "", Ci.nsIMsgCompType.New);
    });
  },

  async appendDraft({ folder, text }) {
    const file = Services.dirsvc.get("TmpD", Ci.nsIFile);
    file.append("tiermail-draft.eml");
    file.createUnique(Ci.nsIFile.NORMAL_FILE_TYPE, 0o600);
    const stream = Cc["@mozilla.org/network/file-output-stream;1"]
      .createInstance(Ci.nsIFileOutputStream);
    stream.init(file, 0x02 | 0x08 | 0x20, 0o600, 0);
    const bytes = String.fromCharCode(...new TextEncoder().encode(text));
    stream.write(bytes, bytes.length);
    stream.close();
    const status = await untilCopied(l => MailServices.copy.copyFileMessage(
      file, folderAt(folder), null, true, Ci.nsMsgMessageFlags.Read, "", l, null));
    file.remove(false);
    return status;
  },
};

function run(step, args) {
  return steps[step](args);
}
