// store.go holds the user store: every registered user, kept in memory for
// fast lookups and in one human-readable JSON file so that users survive a
// restart. It plays the part of the tutorial's database and knows nothing of
// HTTP, passwords or tokens: it keeps what it is given.
//
// Two promises shape it. A change reaches the disk before the caller is told
// it happened, and it is written so that a crash at any instant leaves either
// the old file or the new one whole. And a reader never waits for the disk:
// the new file is written before the change is swapped into memory, under a
// lock that readers do not take.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/crypto/bcrypt"
)

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

	// writeMu is held by a change from start to end, disk write included, so
	// changes happen one at a time. Readers never take it. It also guards
	// encoded, which only changes use.
	writeMu sync.Mutex
	// encoded holds one line of JSON per user, in id order, ready to be
	// written; a change appends one line instead of encoding every user anew.
	encoded []byte

	// mu guards the fields below. Readers hold it for a map lookup; a change
	// holds it only to swap in a user whose file is already on disk.
	mu      sync.RWMutex
	byEmail map[string]User // key: the user's normalised email
	nextID  int64
}

// openStore loads the users file at path. A missing file is an empty store;
// it is created on the first change, so its folder must exist. A file that
// cannot be read or is not a valid users file is an error naming it, and
// the file is left as it is.
func openStore(path string) (*store, error) {
	s := &store{path: path, byEmail: make(map[string]User), nextID: 1}
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
	// The encoded lines take about as much room as the file: leave a
	// quarter more for the registrations to come.
	s.encoded = make([]byte, 0, len(data)+len(data)/4)
	for _, u := range f.Users {
		s.byEmail[u.Email] = u
		s.encoded = appendUserLine(s.encoded, u)
	}
	s.nextID = f.NextID
	return s, nil
}

// decodeStoreFile parses and checks a users file: one JSON object, no
// unknown fields, ids positive and unique, emails normalised and unique,
// every hash a bcrypt hash, and next_id, if given, above every id.
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

// add registers a user with a normalised email and a password hash, writes
// the users file, and only then makes the user visible. If the file cannot
// be written, nothing changes and the error says why.
func (s *store) add(email, passwordHash string) (User, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()

	// Only changes write byEmail and nextID, and they hold writeMu, so they
	// can be read here without mu.
	if _, taken := s.byEmail[email]; taken {
		return User{}, errEmailTaken
	}
	u := User{ID: s.nextID, Email: email, PasswordHash: passwordHash}

	oldLen := len(s.encoded)
	s.encoded = appendUserLine(s.encoded, u)
	if err := writeFileAtomic(s.path, s.fileParts(u.ID+1)...); err != nil {
		s.encoded = s.encoded[:oldLen]
		return User{}, fmt.Errorf("save users to %s: %w", s.path, err)
	}

	s.mu.Lock()
	s.byEmail[email] = u
	s.nextID = u.ID + 1
	s.mu.Unlock()
	return u, nil
}

// appendUserLine appends u as one line of the users array.
func appendUserLine(buf []byte, u User) []byte {
	line, err := json.Marshal(u)
	if err != nil {
		// A struct of an int and two strings always encodes.
		panic(fmt.Sprintf("encode user: %v", err))
	}
	if len(buf) > 0 {
		buf = append(buf, ",\n"...)
	}
	buf = append(buf, "    "...)
	return append(buf, line...)
}

// fileParts returns the users file's content in parts: s.encoded,
// framed. It is written as it stands, not copied into one buffer: at 100,000
// users a copy would be 12 MB of garbage for every registration.
func (s *store) fileParts(nextID int64) [][]byte {
	head := fmt.Appendf(nil, "{\n  \"next_id\": %d,\n  \"users\": [", nextID)
	if len(s.encoded) == 0 {
		return [][]byte{head, []byte("]\n}\n")}
	}
	return [][]byte{append(head, '\n'), s.encoded, []byte("\n  ]\n}\n")}
}

// writeFileAtomic replaces the file at path with the parts of data, one
// after the other, mode 0600, so that a crash at any instant leaves either
// the old file or the new one whole: it writes a temporary file in the same
// folder, flushes it to disk, renames it over path, and flushes the folder
// so that the rename itself is durable.
func writeFileAtomic(path string, data ...[]byte) error {
	dir, name := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+strings.TrimPrefix(name, ".")+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	renamed := false
	defer func() {
		if !renamed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	// CreateTemp already makes the file 0600; say so explicitly, since the
	// file holds password hashes.
	if err := tmp.Chmod(0o600); err != nil {
		return fmt.Errorf("chmod temporary file: %w", err)
	}
	for _, part := range data {
		if _, err := tmp.Write(part); err != nil {
			return fmt.Errorf("write temporary file: %w", err)
		}
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync temporary file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close temporary file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename temporary file: %w", err)
	}
	renamed = true
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open folder to sync it: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync folder: %w", err)
	}
	return nil
}
