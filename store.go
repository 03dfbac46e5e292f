// store.go holds the user store, the tutorial's database: every user, in
// memory for fast lookups and in one human-readable JSON file so that users
// survive a restart. It knows nothing of HTTP or tokens, and of passwords
// only that a stored hash is a bcrypt hash.
//
// Three promises shape it. A change reaches the disk before the caller
// hears of it, written so that a crash at any instant leaves the old file
// or the new one whole. Memory never disagrees with the file, and a change
// made to the file by hand while the server runs is never overwritten. And
// a reader never waits for the disk: the new file is written first, then
// swapped into memory under a lock that readers hold only for a lookup.

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json/jsontext"
	"encoding/json/v2"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// User is a registered user, as the store keeps it. Its JSON form is the
// users file's; a response to a client must not carry PasswordHash.
type User struct {
	ID           int64  `json:"id"`
	Email        string `json:"email"`
	PasswordHash string `json:"password_hash"`
	// Session is what the user's tokens carry: a new one, made when the
	// user registers, logs out or changes the password, ends every token
	// made before. A users file may hold users without one: their session
	// is empty until their first logout or new password.
	Session string `json:"session"`
}

// newSession returns a new session for a user: 128 random bits, so that no
// two accounts, nor two sessions of one, ever have the same.
func newSession() string { return rand.Text() }

// normalizeEmail trims the surrounding spaces and lower-cases the ASCII
// letters, so that " Ann@Example.com" and "ann@example.com" are one
// account. Only ASCII: Unicode's rules would make the Kelvin sign a k.
func normalizeEmail(email string) string {
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + ('a' - 'A')
		}
		return r
	}, strings.Trim(email, " \t\r\n"))
}

// errEmailTaken is returned by add when the email is already registered.
var errEmailTaken = errors.New("email already registered")

// errNoUser is returned by a change to a user who is not registered, or no
// longer.
var errNoUser = errors.New("no such user")

// errSessionEnded is returned by a change made for a session that has
// ended meanwhile: by a logout, or by another change of the password.
var errSessionEnded = errors.New("the session has ended")

// storeFile is the layout of the users file. NextID is kept so that ids
// never repeat, even if a user is removed from the file by hand.
type storeFile struct {
	NextID int64  `json:"next_id"`
	Users  []User `json:"users"`
}

// What a users file may hold, and how long a change waits for its turn.
const (
	idLimit       = 1 << 53 // ids and next_id stay below it, so that every JSON client reads them exactly
	maxStoredCost = 14      // a comparison takes about a second; each step of cost doubles it
	maxWriteWait  = 2 * time.Second
)

// errStoreBusy refuses a change that did not get its turn to write within
// maxWriteWait, or whose caller gave up first. Nothing was changed.
var errStoreBusy = errors.New("users file busy: other changes are being written")

// store is the set of registered users. Create one with openStore.
type store struct {
	path         string // the users file, as named
	file         string // the file written: path, or the one a link at path points to
	disk         diskSteps
	maxWriteWait time.Duration

	// writing holds a token while a change is made, disk write included:
	// changes take turns, readers never wait. It guards the fields up to mu.
	writing chan struct{}
	users   []User // every user, in the file's order
	nextID  int64
	written os.FileInfo // the file as last read or written; nil for none

	// mu guards byEmail, held for a lookup, or to put in a user already on disk.
	mu      sync.RWMutex
	byEmail map[string]User // key: the user's normalised email
}

// diskSteps are the steps of a write that make it durable and visible, as
// fields so that a test can watch them, fail one, or act between them.
type diskSteps struct {
	sync   func(*os.File) error // flush a file, or a folder, to the disk
	rename func(oldpath, newpath string) error
}

// openStore loads the users file at path. A missing file is an empty store,
// created on the first change, so its folder must exist. A file that is not
// a valid users file is an error naming it, and is left as it is. A file
// others may read is loaded with a warning.
func openStore(path string, logger *slog.Logger) (*store, error) {
	file, err := followLinks(path)
	if err != nil {
		return nil, err
	}
	s := &store{
		path:         path,
		file:         file,
		disk:         diskSteps{sync: (*os.File).Sync, rename: os.Rename},
		maxWriteWait: maxWriteWait,
		writing:      make(chan struct{}, 1),
		nextID:       1,
		byEmail:      make(map[string]User),
	}
	f, err := os.Open(file)
	if errors.Is(err, os.ErrNotExist) {
		// The missing folder is an error now, at start, rather than the
		// first registration's 500.
		if info, err := os.Stat(filepath.Dir(file)); err != nil || !info.IsDir() {
			return nil, fmt.Errorf("users file %s cannot be created: its folder does not exist", path)
		}
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open users file: %w", err)
	}
	defer f.Close()
	info, err := f.Stat() // what the file is as read, for checkUnchanged
	var data []byte
	if err == nil {
		data, err = io.ReadAll(f)
	}
	if err != nil {
		return nil, fmt.Errorf("read users file %s: %w", path, err)
	}
	var sf storeFile
	if err := decodeStoreFile(data, &sf); err != nil {
		return nil, fmt.Errorf("users file %s is not a valid users file (it was left untouched): %w", path, err)
	}
	if info.Mode().Perm()&0o077 != 0 {
		logger.Warn("users file can be read by other users of this machine; chmod 600 it",
			"file", path, "mode", info.Mode().Perm())
	}
	for _, u := range sf.Users {
		s.byEmail[u.Email] = u
	}
	s.users, s.nextID, s.written = sf.Users, sf.NextID, info
	return s, nil
}

// followLinks returns path, or if it is a symbolic link, the file at the
// end of its links, made or not: writes replace that file, links stay.
func followLinks(path string) (string, error) {
	for range 40 { // as many links as Linux follows
		target, err := os.Readlink(path)
		if err != nil { // not a link
			return path, nil
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(path), target)
		}
		path = target
	}
	return "", fmt.Errorf("users file %s: too many symbolic links", path)
}

// decodeStoreFile parses and checks a users file: one JSON object, read as
// strictly as a request body (UTF-8, member names exactly as written, none
// twice), no unknown members (a later write would drop them), ids positive,
// unique and below 2^53, emails normalised and unique, every hash a bcrypt
// hash of a cost the server can bear, and next_id, if given, above every id.
func decodeStoreFile(data []byte, f *storeFile) error {
	if !bytes.HasPrefix(bytes.TrimSpace(data), []byte("{")) {
		return errors.New("not a JSON object")
	}
	err := json.Unmarshal(data, f, json.RejectUnknownMembers(true))
	var syntax *jsontext.SyntacticError
	var semantic *json.SemanticError
	switch {
	case errors.Is(err, jsontext.ErrDuplicateName) && errors.As(err, &syntax):
		return fmt.Errorf("%s names %q twice", filePart(syntax.JSONPointer.Parent()), syntax.JSONPointer.LastToken())
	case errors.Is(err, json.ErrUnknownName) && errors.As(err, &semantic):
		return fmt.Errorf("%s has a member %q, which is none the server knows (names are matched exactly)",
			filePart(semantic.JSONPointer.Parent()), semantic.JSONPointer.LastToken())
	case err != nil:
		return fmt.Errorf("decode JSON: %w", err)
	}
	ids := make(map[int64]bool, len(f.Users))
	emails := make(map[string]bool, len(f.Users))
	var maxID int64
	for i, u := range f.Users {
		switch {
		case u.ID < 1 || u.ID >= idLimit:
			return fmt.Errorf("user %d: id %d is not between 1 and 2^53", i, u.ID)
		case ids[u.ID]:
			return fmt.Errorf("user %d: duplicate id %d", i, u.ID)
		case u.Email == "" || u.Email != normalizeEmail(u.Email):
			return fmt.Errorf("user %d: email %q is not lower-case and trimmed", i, u.Email)
		case emails[u.Email]:
			return fmt.Errorf("user %d: duplicate email %q", i, u.Email)
		}
		if err := checkHash(u.PasswordHash); err != nil {
			return fmt.Errorf("user %d (%s): password_hash %w", i, u.Email, err)
		}
		ids[u.ID], emails[u.Email] = true, true
		maxID = max(maxID, u.ID)
	}
	if f.NextID == 0 { // not given, as in a file written by hand
		f.NextID = maxID + 1
	}
	switch {
	case f.NextID <= maxID:
		return fmt.Errorf("next_id %d is not above the largest id %d", f.NextID, maxID)
	case f.NextID >= idLimit:
		return fmt.Errorf("next_id %d is not below 2^53", f.NextID)
	}
	return nil
}

// filePart names the part of the users file at p: "user 3" for the fourth
// user, "the file" for the whole.
func filePart(p jsontext.Pointer) string {
	if user, ok := strings.CutPrefix(string(p), "/users/"); ok {
		return "user " + user
	}
	if p == "" {
		return "the file"
	}
	return string(p)
}

// bcryptAlphabet is the base64 alphabet of bcrypt's hashes.
const bcryptAlphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// checkHash checks a stored hash whole, as bcrypt writes one: 60 bytes,
// "$2a$", "$2b$" or "$2y$", two digits of cost, "$", then 53 characters of
// bcrypt's alphabet (the salt and the hash). A hash that only looks like
// one fails every comparison at once, and so would answer a wrong password
// sooner than any other, telling that its email exists. The cost is 4 at
// least, as bcrypt's, and 14 at most: every failed login costs as much as
// the costliest comparison, and at 15 one takes over a second.
func checkHash(hash string) error {
	if len(hash) != 60 || !slices.Contains([]string{"$2a$", "$2b$", "$2y$"}, hash[:4]) || hash[6] != '$' ||
		strings.Trim(hash[4:6], "0123456789") != "" || strings.Trim(hash[7:], bcryptAlphabet) != "" {
		return errors.New(`is not a bcrypt hash: 60 bytes, "$2a$", "$2b$" or "$2y$", two digits of cost, "$", and 53 of ./A-Za-z0-9`)
	}
	if cost, _ := strconv.Atoi(hash[4:6]); cost < bcrypt.MinCost || cost > maxStoredCost {
		return fmt.Errorf("has a bcrypt cost of %d, outside %d to %d (bcrypt takes none lower; at 15 one comparison takes over a second, and so would every failed login)", cost, bcrypt.MinCost, maxStoredCost)
	}
	return nil
}

// lookup returns a copy of the user registered with email, which must
// already be normalised.
func (s *store) lookup(email string) (User, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	u, ok := s.byEmail[email]
	return u, ok
}

// costliestCost returns the highest bcrypt cost of the stored hashes.
func (s *store) costliestCost() int {
	s.writing <- struct{}{} // the turn to read s.users, as a change takes it
	defer s.unlockWrites()
	costliest := 0
	for _, u := range s.users {
		cost, _ := bcrypt.Cost([]byte(u.PasswordHash)) // checked when the file was read
		costliest = max(costliest, cost)
	}
	return costliest
}

// add registers a user with a normalised email and a password hash, and a
// new session, as save writes it. Each change rewrites the whole file, so
// its cost grows with the users.
func (s *store) add(ctx context.Context, email, passwordHash string) (User, error) {
	if err := s.lockWrites(ctx); err != nil {
		return User{}, err
	}
	defer s.unlockWrites()
	// Only changes write byEmail, and one at a time, so no mu to read it.
	if _, taken := s.byEmail[email]; taken {
		return User{}, errEmailTaken
	}
	if s.nextID+1 >= idLimit {
		return User{}, fmt.Errorf("users file %s: no ids left below 2^53", s.path)
	}
	u := User{ID: s.nextID, Email: email, PasswordHash: passwordHash, Session: newSession()}
	users := append(s.users, u) // s.users keeps its length until the file is written
	return u, s.save(ctx, users, u.ID+1, func(byEmail map[string]User) { byEmail[u.Email] = u })
}

// update changes the user whose id this is with change, as save writes
// it, and returns the user as changed. If change returns an error, nothing
// is changed.
func (s *store) update(ctx context.Context, id int64, change func(*User) error) (User, error) {
	if err := s.lockWrites(ctx); err != nil {
		return User{}, err
	}
	defer s.unlockWrites()
	i := slices.IndexFunc(s.users, func(u User) bool { return u.ID == id })
	if i < 0 {
		return User{}, errNoUser
	}
	users := slices.Clone(s.users)
	if err := change(&users[i]); err != nil {
		return User{}, err
	}
	u := users[i]
	return u, s.save(ctx, users, s.nextID, func(byEmail map[string]User) { byEmail[u.Email] = u })
}

// setHash replaces the password hash of the user whose id this is, if it
// is still oldHash: a rehash never undoes a password changed meanwhile. The
// session stays, so a rehash ends no token.
func (s *store) setHash(ctx context.Context, id int64, oldHash, newHash string) error {
	_, err := s.update(ctx, id, func(u *User) error {
		if u.PasswordHash != oldHash {
			return errors.New("the password changed meanwhile")
		}
		u.PasswordHash = newHash
		return nil
	})
	return err
}

// setPassword replaces the password hash of the user whose id this is and
// gives the user a new session: every token issued before is refused. It
// does so only if the user's session is still session, the one whose
// token asked: of two changes made with one token, the second fails.
func (s *store) setPassword(ctx context.Context, id int64, session, passwordHash string) (User, error) {
	return s.update(ctx, id, func(u *User) error {
		if u.Session != session {
			return errSessionEnded
		}
		u.PasswordHash, u.Session = passwordHash, newSession()
		return nil
	})
}

// endSessions gives the user whose id this is a new session: every token
// issued to the user until now is refused, on every device.
func (s *store) endSessions(ctx context.Context, id int64) error {
	_, err := s.update(ctx, id, func(u *User) error {
		u.Session = newSession()
		return nil
	})
	return err
}

// remove removes the user whose id this is, as save writes it, if the
// user's session is still session, the one whose token asked. next_id
// stays, so the id is never given again.
func (s *store) remove(ctx context.Context, id int64, session string) error {
	if err := s.lockWrites(ctx); err != nil {
		return err
	}
	defer s.unlockWrites()
	i := slices.IndexFunc(s.users, func(u User) bool { return u.ID == id })
	switch {
	case i < 0:
		return errNoUser
	case s.users[i].Session != session:
		return errSessionEnded
	}
	gone := s.users[i].Email
	users := slices.Delete(slices.Clone(s.users), i, i+1)
	return s.save(ctx, users, s.nextID, func(byEmail map[string]User) { delete(byEmail, gone) })
}

// lockWrites takes the turn to change the file, or returns errStoreBusy
// after maxWriteWait: a change never queues without bound behind others,
// so its client always hears how it ended.
func (s *store) lockWrites(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.maxWriteWait)
	defer cancel()
	select {
	case s.writing <- struct{}{}:
		return nil
	case <-ctx.Done():
		return errStoreBusy
	}
}

func (s *store) unlockWrites() { <-s.writing }

// save writes users and nextID to the file, then makes them what readers
// see, with apply making the same change to byEmail. If the new file is not
// in place, nothing changes. If it is, but the folder's sync failed, memory
// follows the file, and the error still says why.
func (s *store) save(ctx context.Context, users []User, nextID int64, apply func(byEmail map[string]User)) error {
	renamed, info, err := s.writeFile(ctx, storeFile{NextID: nextID, Users: users})
	if !renamed {
		return fmt.Errorf("save users to %s: %w", s.path, err)
	}
	s.users, s.nextID, s.written = users, nextID, info
	s.mu.Lock()
	apply(s.byEmail)
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("save users to %s: %w", s.path, err)
	}
	return nil
}

// writeFile replaces the users file with f, so that a crash at any instant
// leaves the old file or the new one whole: a temporary file in the same
// folder, flushed to disk, renamed over the file, then the folder flushed
// so that the rename is durable too. It reports whether the rename
// happened, after which the new file is the one everyone sees, and its info.
func (s *store) writeFile(ctx context.Context, f storeFile) (renamed bool, info os.FileInfo, err error) {
	dir, name := filepath.Split(s.file)
	if dir == "" {
		dir = "."
	}
	// CreateTemp makes the file 0600: only its owner may read the hashes.
	tmp, err := os.CreateTemp(dir, "."+strings.TrimPrefix(name, ".")+".tmp-*")
	if err != nil {
		return false, nil, fmt.Errorf("create temporary file: %w", err)
	}
	defer func() {
		if !renamed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := encodeStoreFile(tmp, f); err != nil {
		return false, nil, fmt.Errorf("write temporary file: %w", err)
	}
	if err := s.disk.sync(tmp); err != nil {
		return false, nil, fmt.Errorf("sync temporary file: %w", err)
	}
	if info, err = tmp.Stat(); err != nil {
		return false, nil, fmt.Errorf("stat temporary file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return false, nil, fmt.Errorf("close temporary file: %w", err)
	}
	// As late as can be: a client that gave up is not registered after
	// all, and a file changed by hand is not overwritten.
	if ctx.Err() != nil {
		return false, nil, errStoreBusy
	}
	if err := s.checkUnchanged(); err != nil {
		return false, nil, err
	}
	if err := s.disk.rename(tmp.Name(), s.file); err != nil {
		return false, nil, fmt.Errorf("rename temporary file: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return true, info, fmt.Errorf("open folder to sync it: %w", err)
	}
	defer d.Close()
	if err := s.disk.sync(d); err != nil {
		return true, info, fmt.Errorf("sync folder: %w", err)
	}
	return true, info, nil
}

// checkUnchanged returns an error if the users file is not as the server
// last read or wrote it: writing now would undo a hand edit without a
// word. An edit in place changes the size or modification time, and an
// editor's save (a new file renamed over it) the identity: os.Stat tells.
func (s *store) checkUnchanged() error {
	now, err := os.Stat(s.path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("check users file %s: %w", s.path, err)
	}
	unchanged := now == nil && s.written == nil ||
		now != nil && s.written != nil && os.SameFile(now, s.written) &&
			now.Size() == s.written.Size() && now.ModTime().Equal(s.written.ModTime())
	if !unchanged {
		return errors.New("the file changed on disk while the server ran, so it was not overwritten: restart the server to load it")
	}
	return nil
}

// encodeStoreFile writes the users file to w, never whole in memory: JSON
// with one user per line, so that it reads, and is edited, a user at a time.
// Emails are written as they are: "a&b@x.io", not "a\u0026b@x.io".
func encodeStoreFile(w io.Writer, f storeFile) error {
	out := bufio.NewWriter(w)
	fmt.Fprintf(out, "{\n  \"next_id\": %d,\n  \"users\": [", f.NextID)
	for i, u := range f.Users {
		if i > 0 {
			out.WriteByte(',')
		}
		out.WriteString("\n    ")
		json.MarshalWrite(out, u) // a struct of a number and strings always encodes
	}
	out.WriteString("\n  ]\n}\n")
	return out.Flush() // reports any error of the writes above
}
