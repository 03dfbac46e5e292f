// jwt.go holds the access token: an HS256 JSON Web Token (RFC 7519) that
// signs the user's email for 30 minutes, built from crypto/hmac,
// crypto/sha256 and encoding/base64 rather than a library, so that every
// check a verifier must make is in plain sight. It knows nothing of users:
// the caller decides whether the token's subject still exists.
//
// A token is three base64url segments joined by dots: a header saying how
// it is signed, the claims, and the HMAC-SHA256 of the first two segments.
// verifyAccessToken makes the checks of RFC 7519 section 7.2 and RFC 8725.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

const (
	accessTokenLifetime = 30 * time.Minute
	maxTokenBytes       = 8 << 10
	minSecretBytes      = 32 // HMAC-SHA256 wants a key at least as long as its output

	// jwtHeader is the base64url encoding of {"alg":"HS256","typ":"JWT"},
	// the header of every token this server issues.
	jwtHeader = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
)

// errInvalidToken is wrapped by every reason a token is refused.
var errInvalidToken = errors.New("invalid token")

// b64 is base64url without padding, strict: trailing bits must be zero, so
// that each token has exactly one spelling.
var b64 = base64.RawURLEncoding.Strict()

// signingKey signs and checks tokens with one secret. Setting up an HMAC
// with the key costs more than signing a token, so keyed HMACs are kept in
// a pool and reused: Reset takes one back to its freshly keyed state.
type signingKey struct {
	macs sync.Pool // of hash.Hash: hmac.New(sha256.New, secret)
}

// newSigningKey returns the signing key for secret.
func newSigningKey(secret []byte) *signingKey {
	secret = bytes.Clone(secret)
	k := &signingKey{}
	k.macs.New = func() any { return hmac.New(sha256.New, secret) }
	return k
}

// sign returns the HMAC-SHA256 of the signing input under the key.
func (k *signingKey) sign(signingInput string) []byte {
	mac := k.macs.Get().(hash.Hash)
	defer k.macs.Put(mac)
	mac.Reset()
	io.WriteString(mac, signingInput)
	return mac.Sum(nil)
}

// createAccessToken returns a token for email, issued at now and expiring
// 30 minutes later, signed with key.
func createAccessToken(email string, key *signingKey, now time.Time) (string, error) {
	claims, err := json.Marshal(struct {
		Sub string `json:"sub"`
		Iat int64  `json:"iat"`
		Exp int64  `json:"exp"`
	}{email, now.Unix(), now.Add(accessTokenLifetime).Unix()})
	if err != nil {
		return "", fmt.Errorf("encode claims: %w", err)
	}
	signingInput := jwtHeader + "." + b64.EncodeToString(claims)
	return signingInput + "." + b64.EncodeToString(key.sign(signingInput)), nil
}

// verifyAccessToken checks token at time now and returns its subject, the
// email it was issued for. Every refusal wraps errInvalidToken.
func verifyAccessToken(token string, key *signingKey, now time.Time) (string, error) {
	if len(token) > maxTokenBytes {
		return "", fmt.Errorf("%w: longer than %d bytes", errInvalidToken, maxTokenBytes)
	}
	headerSeg, claimsSeg, sigSeg, ok := splitToken(token)
	if !ok {
		return "", fmt.Errorf("%w: not three base64url segments", errInvalidToken)
	}

	// Only HS256: a token must not choose its own check ("none", or an
	// algorithm whose key could be confused with ours).
	if err := checkHeader(headerSeg); err != nil {
		return "", fmt.Errorf("%w: header: %w", errInvalidToken, err)
	}

	// Over the segments as received, compared in constant time.
	sig, err := b64.DecodeString(sigSeg)
	if err != nil || !hmac.Equal(sig, key.sign(token[:len(headerSeg)+1+len(claimsSeg)])) {
		return "", fmt.Errorf("%w: bad signature", errInvalidToken)
	}

	var claims map[string]json.RawMessage
	if err := decodeSegment(claimsSeg, &claims); err != nil {
		return "", fmt.Errorf("%w: claims: %w", errInvalidToken, err)
	}
	nowSeconds := float64(now.UnixNano()) / 1e9
	exp, ok := jsonNumber(claims["exp"])
	if !ok {
		return "", fmt.Errorf("%w: exp missing or not a number", errInvalidToken)
	}
	if nowSeconds >= exp {
		return "", fmt.Errorf("%w: expired", errInvalidToken)
	}
	if raw, present := claims["nbf"]; present {
		nbf, ok := jsonNumber(raw)
		if !ok || nbf > nowSeconds {
			return "", fmt.Errorf("%w: nbf not a number or in the future", errInvalidToken)
		}
	}
	sub, ok := jsonString(claims["sub"])
	if !ok || sub == "" {
		return "", fmt.Errorf("%w: sub missing or not a non-empty string", errInvalidToken)
	}
	return sub, nil
}

// checkHeader checks that a token's header is a JSON object whose alg is
// HS256, whose typ, if present, is JWT, and which has no crit: an extension
// the token says we must understand is one we do not.
func checkHeader(seg string) error {
	if seg == jwtHeader {
		return nil // the header this server and most libraries write: it passes
	}
	var header map[string]json.RawMessage
	if err := decodeSegment(seg, &header); err != nil {
		return err
	}
	if alg, ok := jsonString(header["alg"]); !ok || alg != "HS256" {
		return errors.New("alg is not HS256")
	}
	if raw, present := header["typ"]; present {
		if typ, ok := jsonString(raw); !ok || typ != "JWT" {
			return errors.New("typ is not JWT")
		}
	}
	if _, present := header["crit"]; present {
		return errors.New("crit present")
	}
	return nil
}

// splitToken splits a compact JWT into its three segments, and reports
// whether there are exactly three. Each segment is checked as strict
// base64url when it is decoded; CR and LF are refused here, since the
// base64 decoder would skip them.
func splitToken(token string) (header, claims, sig string, ok bool) {
	if strings.ContainsAny(token, "\r\n") || strings.Count(token, ".") != 2 {
		return "", "", "", false
	}
	header, rest, _ := strings.Cut(token, ".")
	claims, sig, _ = strings.Cut(rest, ".")
	return header, claims, sig, true
}

// decodeSegment decodes a base64url segment holding a JSON object into v.
func decodeSegment(seg string, v *map[string]json.RawMessage) error {
	data, err := b64.DecodeString(seg)
	if err != nil {
		return fmt.Errorf("base64url: %w", err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("JSON: %w", err)
	}
	if *v == nil { // the JSON was null
		return errors.New("JSON: not an object")
	}
	return nil
}

// jsonString returns the value of raw, a valid JSON value, if it is a
// string. Most strings, like an email, need no unescaping: those are read
// as they stand, sparing a json.Unmarshal on every request.
func jsonString(raw json.RawMessage) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	if inner := raw[1 : len(raw)-1]; bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner) {
		return string(inner), true
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// jsonNumber returns the value of raw, a valid JSON value, if it is a
// number.
func jsonNumber(raw json.RawMessage) (float64, bool) {
	if len(raw) == 0 || (raw[0] != '-' && (raw[0] < '0' || raw[0] > '9')) {
		return 0, false
	}
	// A JSON number is also Go's float syntax; out of range is an error.
	f, err := strconv.ParseFloat(string(raw), 64)
	return f, err == nil
}
