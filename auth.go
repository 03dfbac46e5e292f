// auth.go holds passwords and users: the tutorial's User, hashPassword and
// verifyPassword, the rules an email and a password must meet, and accounts,
// which registers users and checks a login.
//
// A failed login must not tell anyone which emails are registered, neither
// by what it says nor by how long it takes. So a login for an unknown email
// still runs one bcrypt comparison, against a dummy hash made at start, and
// every failure is the same errInvalidCredentials.
package main

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net/mail"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// The rules for what a user registers with.
const (
	maxEmailBytes    = 254 // the longest address SMTP can carry (RFC 5321, with erratum 1690)
	minPasswordBytes = 8
	maxPasswordBytes = 72 // bcrypt reads no further; a longer password is refused, never cut
)

// errInvalidCredentials is every failed login: unknown email and wrong
// password alike.
var errInvalidCredentials = errors.New("invalid email or password")

// User is a registered user, as the store keeps it. Its JSON form is the
// users file's; a response to a client must not carry PasswordHash.
type User struct {
	ID           int64  `json:"id"`
	Email        string `json:"email"`
	PasswordHash string `json:"password_hash"`
}

// validationError says which rule a registration broke, in a sentence for
// the client.
type validationError string

func (e validationError) Error() string { return string(e) }

// normalizeEmail trims the surrounding spaces and lower-cases the email, so
// that " Ann@Example.com" and "ann@example.com" are one account.
func normalizeEmail(email string) string {
	return strings.ToLower(strings.TrimSpace(email))
}

// validateEmail checks a normalised email: a bare address that net/mail
// accepts (no display name, no angle brackets), at most 254 bytes.
func validateEmail(email string) error {
	if len(email) > maxEmailBytes {
		return validationError(fmt.Sprintf("email must be at most %d bytes", maxEmailBytes))
	}
	addr, err := mail.ParseAddress(email)
	if err != nil || addr.Name != "" || addr.Address != email {
		return validationError("email must be a plain address such as ann@example.com")
	}
	return nil
}

// validatePassword checks a new password's length in bytes.
func validatePassword(password string) error {
	switch {
	case len(password) < minPasswordBytes:
		return validationError(fmt.Sprintf("password must be at least %d bytes", minPasswordBytes))
	case len(password) > maxPasswordBytes:
		return validationError(fmt.Sprintf("password must be at most %d bytes (the limit of bcrypt)", maxPasswordBytes))
	}
	return nil
}

// hashPassword returns the bcrypt hash of password at the given cost.
func hashPassword(password string, cost int) (string, error) {
	hash, err := bcrypt.GenerateFromPassword([]byte(password), cost)
	if err != nil {
		return "", fmt.Errorf("hash password: %w", err)
	}
	return string(hash), nil
}

// verifyPassword reports whether password matches the bcrypt hash, in time
// that does not depend on where they differ.
func verifyPassword(password, hash string) bool {
	err := bcrypt.CompareHashAndPassword([]byte(hash), []byte(password))
	// bcrypt reads only the first 72 bytes, so a longer password would match
	// the hash of its first 72. It still ran the comparison above, so that
	// refusing it takes the same time as any wrong password.
	return err == nil && len(password) <= maxPasswordBytes
}

// accounts registers users and checks logins against the store.
type accounts struct {
	users *store
	cost  int // bcrypt cost of new hashes: bcrypt.DefaultCost, or MinCost in tests
	// dummyHash is compared when a login names an unknown email, so that it
	// costs the same time as a wrong password and does not reveal which
	// emails are registered.
	dummyHash string
}

// newAccounts returns accounts over users, hashing new passwords at cost.
func newAccounts(users *store, cost int) (*accounts, error) {
	dummyHash, err := hashPassword(rand.Text(), cost)
	if err != nil {
		return nil, fmt.Errorf("make dummy hash: %w", err)
	}
	return &accounts{users: users, cost: cost, dummyHash: dummyHash}, nil
}

// register creates a user. It returns a validationError if the email or
// password breaks a rule, and errEmailTaken if the email is registered.
func (a *accounts) register(email, password string) (User, error) {
	email = normalizeEmail(email)
	if err := validateEmail(email); err != nil {
		return User{}, err
	}
	if err := validatePassword(password); err != nil {
		return User{}, err
	}
	// Checked again by the store, which decides races; this check only
	// spares a bcrypt run for an email already taken.
	if _, taken := a.users.lookup(email); taken {
		return User{}, errEmailTaken
	}
	// bcrypt runs here, before the store takes any lock.
	hash, err := hashPassword(password, a.cost)
	if err != nil {
		return User{}, err
	}
	return a.users.add(email, hash)
}

// authenticate returns the user whose email and password these are, or
// errInvalidCredentials. It applies none of the registration rules: any
// password is simply compared with the stored hash.
func (a *accounts) authenticate(email, password string) (User, error) {
	u, found := a.users.lookup(normalizeEmail(email))
	if !found {
		// Same bcrypt cost as a wrong password, so timing does not reveal
		// that the email is unknown.
		verifyPassword(password, a.dummyHash)
		return User{}, errInvalidCredentials
	}
	if !verifyPassword(password, u.PasswordHash) {
		return User{}, errInvalidCredentials
	}
	return u, nil
}
