// store.go holds the user store: every registered user, kept in memory for
// fast lookups and in one human-readable JSON file so that users survive a
// restart. It plays the part of the tutorial's database. It knows nothing
// of HTTP or tokens, and of passwords only that a stored hash must be a
// bcrypt hash.
//
// Three promises shape it. A change reaches the disk before the caller is
// told it happened, and it is written so that a crash at any instant leaves
// either the old file or the new one whole. Memory never disagrees with the
// file, and the file belongs to the server: a change made to it by hand
// while the server runs is never overwritten. And a reader never waits for
// the disk: the new file is written before the change is swapped into
// memory, under a lock that readers do not take.

package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/crypto/bcrypt"
)

// User is a registered user, as the store keeps it. Its JSON form is the
// users file's; a response to a client must not carry PasswordHash.
type User struct {
	ID           int64  `json:"id"`
	Email        string `json:"email"`
	PasswordHash string `json:"password_hash"`
}

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

// storeFile is the layout of the users file. NextID is kept so that ids
// never repeat, even if a user is removed from the file by hand.
type storeFile struct {
	NextID int64  `json:"next_id"`
	Users  []User `json:"users"`
}

// store is the set of registered users. Create one with openStore.
type store struct {
	path string
	disk diskSteps

	// writeMu is held by a change from start to end, disk write included, so
	// changes happen one at a time. Readers never take it. It also guards
	// the fields up to mu, which only changes use.
	writeMu sync.Mutex
	users   []User // every user, in the file's order
	nextID  int64
	fileSum string // the SHA-256 of the file as last read or written; "" for no file

	// mu guards byEmail. Readers hold it for a map lookup; a change holds it
	// only to add a user whose file is already on disk.
	mu      sync.RWMutex
	byEmail map[string]User // key: the user's normalised email
}

// diskSteps are the two steps of a write that make it durable and visible.
// They are fields, set by openStore to the real ones, so that a test can
// watch their order or make one fail.
type diskSteps struct {
	sync   func(*os.File) error // flush a file, or a folder, to the disk
	rename func(oldpath, newpath string) error
}

// openStore loads the users file at path. A missing file is an empty store;
// it is created on the first change, so its folder must exist. A file that
// cannot be read or is not a valid users file is an error naming it, and
// the file is left as it is. A file others may read is loaded with a
// warning.
func openStore(path string, logger *slog.Logger) (*store, error) {
	s := &store{
		path:    path,
		disk:    diskSteps{sync: (*os.File).Sync, rename: os.Rename},
		byEmail: make(map[string]User),
		nextID:  1,
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		// Said now rather than at the first registration's 500.
		if info, err := os.Stat(filepath.Dir(path)); err != nil || !info.IsDir() {
			return nil, fmt.Errorf("users file %s cannot be created: its folder does not exist", path)
		}
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read users file: %w", err)
	}
	var f storeFile
	if err := decodeStoreFile(data, &f); err != nil {
		return nil, fmt.Errorf("users file %s is not a valid users file (it was left untouched): %w", path, err)
	}
	if info, err := os.Stat(path); err == nil && info.Mode().Perm()&0o077 != 0 {
		logger.Warn("users file can be read by other users of this machine; chmod 600 it",
			"file", path, "mode", info.Mode().Perm())
	}
	for _, u := range f.Users {
		s.byEmail[u.Email] = u
	}
	sum := sha256.Sum256(data)
	s.users, s.nextID, s.fileSum = f.Users, f.NextID, string(sum[:])
	return s, nil
}

// decodeStoreFile parses and checks a users file: one JSON object, no
// unknown fields (a later write would drop them), ids positive and unique,
// emails normalised and unique, every hash a bcrypt hash, and next_id, if
// given, above every id.
func decodeStoreFile(data []byte, f *storeFile) error {
	if !bytes.HasPrefix(bytes.TrimSpace(data), []byte("{")) {
		return errors.New("not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(f); err != nil {
		return fmt.Errorf("decode JSON: %w", err)
	}
	if err := dec.Decode(&struct{}{}); err != io.EOF {
		return errors.New("data after the JSON object")
	}
	ids := make(map[int64]bool, len(f.Users))
	emails := make(map[string]bool, len(f.Users))
	var maxID int64
	for i, u := range f.Users {
		switch {
		case u.ID < 1:
			return fmt.Errorf("user %d: id %d is not positive", i, u.ID)
		case ids[u.ID]:
			return fmt.Errorf("user %d: duplicate id %d", i, u.ID)
		case u.Email == "" || u.Email != normalizeEmail(u.Email):
			return fmt.Errorf("user %d: email %q is not lower-case and trimmed", i, u.Email)
		case emails[u.Email]:
			return fmt.Errorf("user %d: duplicate email %q", i, u.Email)
		}
		if _, err := bcrypt.Cost([]byte(u.PasswordHash)); err != nil {
			return fmt.Errorf("user %d: password_hash is not a bcrypt hash: %w", i, err)
		}
		ids[u.ID], emails[u.Email] = true, true
		maxID = max(maxID, u.ID)
	}
	switch {
	case f.NextID == 0: // not given, as in a file written by hand
		f.NextID = maxID + 1
	case f.NextID <= maxID:
		return fmt.Errorf("next_id %d is not above the largest id %d", f.NextID, maxID)
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

// costliestHash returns the highest bcrypt cost among the stored hashes, or
// 0 if there are none.
func (s *store) costliestHash() int {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	highest := 0
	for _, u := range s.users {
		cost, _ := bcrypt.Cost([]byte(u.PasswordHash)) // checked when loaded
		highest = max(highest, cost)
	}
	return highest
}

// add registers a user with a normalised email and a password hash, writes
// the users file, and only then makes the user visible. If the new file is
// not in place, nothing changes and the error says why. If it is, but a
// later step failed, the user is kept, as the file does, and the error
// still says why.
//
// Each change rewrites the whole file, so its cost grows with the users.
func (s *store) add(email, passwordHash string) (User, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()

	// Only changes write byEmail, and they hold writeMu, so it can be read
	// here without mu.
	if _, taken := s.byEmail[email]; taken {
		return User{}, errEmailTaken
	}
	if err := s.checkUnchanged(); err != nil {
		return User{}, err
	}
	u := User{ID: s.nextID, Email: email, PasswordHash: passwordHash}
	users := append(s.users, u) // s.users keeps its length until the file is written
	sum := sha256.New()
	renamed, err := writeFileAtomic(s.path, s.disk, func(w io.Writer) error {
		return encodeStoreFile(io.MultiWriter(w, sum), storeFile{NextID: u.ID + 1, Users: users})
	})
	if !renamed {
		return User{}, fmt.Errorf("save users to %s: %w", s.path, err)
	}

	s.users, s.nextID, s.fileSum = users, u.ID+1, string(sum.Sum(nil))
	s.mu.Lock()
	s.byEmail[email] = u
	s.mu.Unlock()
	if err != nil {
		return u, fmt.Errorf("save users to %s: %w", s.path, err)
	}
	return u, nil
}

// checkUnchanged returns an error if the users file is not as the server
// last read or wrote it: someone changed it by hand, and writing now would
// undo their change without a word.
func (s *store) checkUnchanged() error {
	sum := ""
	f, err := os.Open(s.path)
	switch {
	case err == nil:
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return fmt.Errorf("read users file %s: %w", s.path, err)
		}
		sum = string(h.Sum(nil))
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("open users file %s: %w", s.path, err)
	}
	if sum != s.fileSum {
		return fmt.Errorf("users file %s changed on disk while the server ran, so it was not overwritten: restart the server to load it", s.path)
	}
	return nil
}

// encodeStoreFile writes the users file's content to w: JSON with one user
// per line, so that the file reads, and is edited, a user at a time. It is
// written a user at a time, never held whole in memory.
func encodeStoreFile(w io.Writer, f storeFile) error {
	out := bufio.NewWriter(w)
	fmt.Fprintf(out, "{\n  \"next_id\": %d,\n  \"users\": [", f.NextID)
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	enc.SetEscapeHTML(false) // emails as they are: "a&b@x.io", not "a\u0026b@x.io"
	for i, u := range f.Users {
		line.Reset()
		enc.Encode(u) // a struct of a number and two strings always encodes
		if i > 0 {
			out.WriteByte(',')
		}
		out.WriteString("\n    ")
		out.Write(bytes.TrimSuffix(line.Bytes(), []byte("\n"))) // Encode ends with one
	}
	out.WriteString("\n  ]\n}\n")
	return out.Flush() // reports any error of the writes above
}

// writeFileAtomic replaces the file at path with what write writes, so that
// a crash at any instant leaves either the old file or the new one whole:
// it writes a temporary file in the same folder, flushes it to disk, renames
// it over path, and flushes the folder so that the rename itself is durable.
// It reports whether the rename happened: from then on the new file is the
// one that readers, and the next start, see.
func writeFileAtomic(path string, disk diskSteps, write func(io.Writer) error) (renamed bool, err error) {
	dir, name := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	// CreateTemp makes the file 0600: only its owner may read the hashes.
	tmp, err := os.CreateTemp(dir, "."+strings.TrimPrefix(name, ".")+".tmp-*")
	if err != nil {
		return false, fmt.Errorf("create temporary file: %w", err)
	}
	defer func() {
		if !renamed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := write(tmp); err != nil {
		return false, fmt.Errorf("write temporary file: %w", err)
	}
	if err := disk.sync(tmp); err != nil {
		return false, fmt.Errorf("sync temporary file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return false, fmt.Errorf("close temporary file: %w", err)
	}
	if err := disk.rename(tmp.Name(), path); err != nil {
		return false, fmt.Errorf("rename temporary file: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return true, fmt.Errorf("open folder to sync it: %w", err)
	}
	defer d.Close()
	if err := disk.sync(d); err != nil {
		return true, fmt.Errorf("sync folder: %w", err)
	}
	return true, nil
}
